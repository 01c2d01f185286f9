"""int4 weights (per-group scales) against int8 and float32: weight bytes, validation loss and
cached decode speed, in one run. One JSON object per line.

    python benchmarks/quant_int4.py --workdir RUN [--workdir RUN2 ...] [--hf_dir tests/fixtures/hf/llama]
        [--group_sizes 128,64,32] [--eval_batches 8] [--batch 1] [--prompt 64] [--new_tokens 64]
        [--repeats 3]

Every --workdir (a trained float run) and the --hf_dir checkpoint (imported first; the fixture has
random weights, so its loss only says how far quantization moves a model, not how good it is) is
quantized with `jaxllm.cli.quantize.quantize_workdir` to int8 and to int4 at each group size that
divides its kernels' input sizes (the others print a `skipped` line with the one-line error).
- `weight_bytes`: the quantizable kernels (values + float32 scales; int4 values at two per byte,
  as the checkpoint stores them) and the whole model, ÷ float32.
- `validation_loss`: --eval_batches batches of the run's own validation split.
- `decode` (first --workdir only): tokens/s of greedy cached decoding, float32 vs int8 vs int4 at
  the first group size that fits, --repeats timed `Generator.generate` calls after one untimed,
  taking turns (benchmarks/decode.py's `time_cached`), median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from decode import prompts_from_validation, time_cached  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import decoding, restore  # noqa: E402
from jaxllm.cli import quantize as quantize_cli  # noqa: E402
from jaxllm.compression import quantize  # noqa: E402
from jaxllm.interop import hf  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", default=[], help="trained float run directory")
    parser.add_argument("--hf_dir", default=None, help="Hugging Face checkpoint to import and quantize")
    parser.add_argument("--group_sizes", default="128,64,32")
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    command = "python benchmarks/quant_int4.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def emit(record):
        print(json.dumps({**record, "command": command.strip()}), flush=True)

    groups = [int(g) for g in args.group_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(os.path.basename(os.path.normpath(w)), w) for w in args.workdir]
        if args.hf_dir:
            imported = os.path.join(tmp, "hf_import")
            hf.import_checkpoint(args.hf_dir, imported, config_lib.Config())
            runs.append((f"hf:{os.path.basename(os.path.normpath(args.hf_dir))} (random weights)", imported))
        for index, (name, workdir) in enumerate(runs):
            variants = {"float32": workdir, "int8": os.path.join(tmp, f"{index}_int8")}
            quantize_cli.quantize_workdir(workdir, variants["int8"])
            for g in groups:
                out = os.path.join(tmp, f"{index}_int4_g{g}")
                try:
                    quantize_cli.quantize_workdir(workdir, out, bits=4, group_size=g)
                except quantize.QuantizationError as e:
                    emit({"metric": "skipped", "run": name, "group_size": g, "error": str(e)})
                    continue
                variants[f"int4_g{g}"] = out
            params = {kind: restore.load_params(w)[1] for kind, w in variants.items()}
            kernels = {kind: quantize.kernel_bytes(p) for kind, p in params.items()}
            whole = {kind: quantize.weight_bytes(p) for kind, p in params.items()}
            emit({"metric": "weight_bytes", "run": name,
                  "kernel_ratio": {k: kernels[k] / kernels["float32"] for k in kernels},
                  "model_ratio": {k: whole[k] / whole["float32"] for k in whole},
                  "kernel_bytes": kernels, "target_int4": "0.125 plus scales (4 B / group size / 4 B)"})
            losses = {kind: quantize_cli.evaluate_workdir(w, args.eval_batches)["eval_loss"]
                      for kind, w in variants.items()}
            emit({"metric": "validation_loss", "run": name, "loss": losses,
                  "relative_increase": {k: losses[k] / losses["float32"] - 1 for k in losses if k != "float32"},
                  "target_int4_g128": 0.02, "eval_batches": args.eval_batches})
            if index == 0:
                cfg = restore.load_params(workdir)[0]
                int4 = next((k for k in variants if k.startswith("int4")), None)
                timed = {k: params[k] for k in ("float32", "int8", int4) if k is not None}
                gen = decoding.Generator(cfg.model)
                sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
                prompts = {args.prompt: prompts_from_validation(cfg, args.batch, args.prompt)}
                cached = time_cached(gen, timed, prompts, sampling, args.repeats)
                steps = {k: cached[args.prompt, k][0] for k in timed}
                emit({"metric": "decode", "run": name, "batch": args.batch, "prompt_len": args.prompt,
                      "new_tokens": args.new_tokens, "repeats": args.repeats,
                      "tokens_per_s": {k: args.batch / s for k, s in steps.items()},
                      "step_ms": {k: 1e3 * s for k, s in steps.items()},
                      "loadavg_1m": os.getloadavg()[0], "devices": str(jax.devices()[0])})
    emit({"metric": "machine", **machine_info()})


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
