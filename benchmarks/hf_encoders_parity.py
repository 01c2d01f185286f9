"""Import time and logits parity of the BERT, RoBERTa, BertForSequenceClassification and GPT-2
importer (interop/hf_encoders.py) on the committed fixtures (tests/fixtures/hf_encoders, written by
`transformers`; or any directory of such checkpoints with a golden.npz). Prints JSON per family:
import wall time (median of --repeats imports into fresh run directories), the largest absolute
logits difference from transformers' on the real tokens, and whether import -> export -> import
gives bit-identical params.

    python benchmarks/hf_encoders_parity.py [--fixtures tests/fixtures/hf_encoders] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from jaxllm import restore
from jaxllm.interop import hf_encoders
from jaxllm.models import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits(cfg, params, ref):
    segments = ref["attention_mask"]
    positions = np.cumsum(segments, axis=1) * segments - segments
    model = MODELS.get(cfg.family).build(cfg)
    args = (ref["input_ids"], segments, positions) + (() if cfg.family == "causal_lm" else (ref["token_type_ids"],))
    return np.asarray(jax.jit(lambda p, *a: model.apply({"params": p}, *a))(params, *args))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "fixtures", "hf_encoders"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report = {"device": str(jax.devices()[0].device_kind), "families": {}}
    for name in sorted(os.listdir(args.fixtures)):
        hf_dir = os.path.join(args.fixtures, name)
        if not os.path.exists(os.path.join(hf_dir, "golden.npz")):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            times = []
            for k in range(args.repeats):
                start = time.perf_counter()
                cfg = hf_encoders.import_checkpoint(hf_dir, os.path.join(tmp, f"run{k}"))
                times.append(time.perf_counter() - start)
            cfg, params = restore.load_params(cfg.workdir)
            ref = dict(np.load(os.path.join(hf_dir, "golden.npz")))
            out = logits(cfg, params, ref)
            if out.ndim == 3:
                real = ref["attention_mask"].astype(bool)
                diff = float(np.abs(out[real] - ref["logits"][real]).max())
            else:
                diff = float(np.abs(out - ref["logits"]).max())
            hf_encoders.export_checkpoint(cfg.workdir, os.path.join(tmp, "exported"))
            again = hf_encoders.import_checkpoint(os.path.join(tmp, "exported"), os.path.join(tmp, "again"))
            _, params_again = restore.load_params(again.workdir)
            identical = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                                                                 jax.tree.leaves(jax.device_get(params_again))))
        report["families"][name] = {
            "architecture": hf_encoders.architecture_of(json.load(open(os.path.join(hf_dir, "config.json")))),
            "family": cfg.family, "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "import_s_median": statistics.median(times), "import_s_all": times,
            "max_abs_logits_diff": diff, "roundtrip_bit_identical": identical}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
