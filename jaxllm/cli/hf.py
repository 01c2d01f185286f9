"""Hugging Face checkpoints in and out.

    python -m jaxllm.hf import --hf_dir path/to/Llama-3.2-1B --workdir runs/llama [key=value ...]
    python -m jaxllm.hf export --workdir runs/llama_tuned --out path/to/hf_dir [--dtype bfloat16]

Import writes a run directory every tool accepts (generate, quantize, prune, training with
init_from=...); the key=value arguments are config overrides for everything but the architecture,
e.g. `mesh.tensor=2 model.param_dtype=bfloat16 model.scan_layers=false`. Export writes safetensors
shards, their index, config.json and the tokenizer, which `transformers` loads with from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from jaxllm import config as config_lib
from jaxllm import restore
from jaxllm.config import Config, ConfigError
from jaxllm.interop import hf, hf_encoders


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Hugging Face checkpoints in and out of jaxllm.")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("import", help="a Hugging Face checkpoint directory -> a jaxllm run directory")
    load.add_argument("--hf_dir", required=True)
    load.add_argument("--workdir", required=True)
    save = commands.add_parser("export", help="a jaxllm run directory -> a Hugging Face checkpoint directory")
    save.add_argument("--workdir", required=True)
    save.add_argument("--out", required=True)
    save.add_argument("--dtype", default="float32", choices=sorted(hf.DTYPES))
    save.add_argument("--max_shard_gb", type=float, default=2.0)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "import":
            # BERT, RoBERTa and GPT-2 have their own maps (interop/hf_encoders.py).
            importer = hf_encoders if hf_encoders.handles(args.hf_dir) else hf
            cfg = importer.import_checkpoint(args.hf_dir, args.workdir, config_lib.override(Config(), rest))
            report = {"workdir": cfg.workdir, "layers": cfg.model.num_layers,
                      "d_model": cfg.model.d_model, "experts": cfg.model.moe.num_experts, "tokenizer": cfg.model.tokenizer}
        else:
            if rest:
                parser.error(f"unexpected arguments {' '.join(rest)}")
            if hf_encoders.hf_architecture(restore.load_config(args.workdir)) is not None:
                report = hf_encoders.export_checkpoint(args.workdir, args.out, args.dtype)
            else:
                report = hf.export_checkpoint(args.workdir, args.out, args.dtype, int(args.max_shard_gb * 2**30))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
