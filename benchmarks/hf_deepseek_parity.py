"""Parity of the DeepSeek-V3 and Qwen3-MoE (mlp_only_layers) importers on the committed fixtures
written by `transformers` 5.24 (tests/fixtures/hf/deepseek_v3, qwen3_moe_dense;
tests/fixtures/make_hf_fixtures_deepseek.py; deepseek_v3_yarn, YaRN RoPE scaling:
make_hf_fixtures_deepseek_yarn.py). Prints JSON per fixture: the largest absolute logits
difference from transformers' on the 80-token input (scanned and unscanned import), whether cached
greedy decoding gives the golden 16 tokens, whether import -> export -> import is bit-identical
(tensors and config), and the import wall time; and the int8 (compression/quantize.py) logit
error of the imported DeepSeek model relative to its logits' spread, with the fraction of
positions whose argmax is unchanged.

    python benchmarks/hf_deepseek_parity.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import jax
import numpy as np

from jaxllm import config as C
from jaxllm import restore
from jaxllm.compression import quantize
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.interop import hf
from jaxllm.models import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")


def logits(cfg, params, input_ids):
    return np.asarray(jax.jit(Transformer(cfg.model).apply)({"params": params}, input_ids))


def check(name: str, tmp: str) -> dict:
    hf_dir = os.path.join(FIXTURES, name)
    ref = dict(np.load(os.path.join(hf_dir, "golden.npz")))
    start = time.perf_counter()
    hf.import_checkpoint(hf_dir, os.path.join(tmp, name))
    seconds = time.perf_counter() - start
    cfg, params = restore.load_params(os.path.join(tmp, name))
    out = {"import_s": round(seconds, 2), "max_abs_logit_diff": float(np.abs(logits(cfg, params, ref["input_ids"]) - ref["logits"]).max())}
    hf.import_checkpoint(hf_dir, os.path.join(tmp, name + "_unscanned"), C.override(C.Config(), ["model.scan_layers=false"]))
    ucfg, uparams = restore.load_params(os.path.join(tmp, name + "_unscanned"))
    out["max_abs_logit_diff_unscanned"] = float(np.abs(logits(ucfg, uparams, ref["input_ids"]) - ref["logits"]).max())
    (tokens,) = Generator(cfg.model).generate(params, [ref["prompt_ids"][0].tolist()],
                                              SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False),
                                              jax.random.key(0))
    out["cached_greedy_equals_golden"] = tokens == ref["greedy"][0].tolist()
    exported = os.path.join(tmp, name + "_exported")
    hf.export_checkpoint(os.path.join(tmp, name), exported)
    hf.import_checkpoint(exported, os.path.join(tmp, name + "_again"))
    again_cfg, again = restore.load_params(os.path.join(tmp, name + "_again"))
    same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), jax.device_get(params), jax.device_get(again)))
    out["round_trip_bit_identical"] = all(same) and again_cfg.model == dataclasses.replace(cfg.model, tokenizer=again_cfg.model.tokenizer)
    if name == "deepseek_v3":
        float_logits = logits(cfg, params, ref["input_ids"])
        int8_logits = logits(cfg, quantize.quantize_params(params), ref["input_ids"])
        out["int8_max_abs_logit_error_over_std"] = float(np.abs(int8_logits - float_logits).max() / float_logits.std())
        out["int8_rms_logit_error_over_std"] = float(np.sqrt(np.mean((int8_logits - float_logits) ** 2)) / float_logits.std())
        out["int8_argmax_agreement"] = float(np.mean(int8_logits.argmax(-1) == float_logits.argmax(-1)))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", nargs="+", default=["deepseek_v3", "qwen3_moe_dense", "deepseek_v3_yarn"])
    args = parser.parse_args(argv)
    report = {"device": str(jax.devices()[0].device_kind), "fixtures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.fixtures:
            report["fixtures"][name] = check(name, tmp)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
