"""Importing a Hugging Face checkpoint: wall time against a plain read of the same files, and peak
resident memory against the bytes of the imported params. One JSON object.

    python benchmarks/hf_import.py [--dir /tmp/jaxllm_llama_1b] [--layers 16] [--dtype bfloat16]

Writes (once, into --dir) a Llama-shaped checkpoint with random weights: d_model 2048, 16 layers,
32 heads / 8 KV heads, MLP 8192, vocab 32000, untied (1.1B params), in 2 GB safetensors shards with
an index, as `save_pretrained` lays them out. Then, each in a fresh process so that peak memory is
its own: `plain_read` reads every tensor whole with safetensors; `import` runs
`interop.hf.read_params` onto a mesh of the local devices (params in --dtype) and blocks until
every array is in place. Targets: import time <= 2x the plain read, peak RSS <= 1.3x params bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=32000)


# Each phase imports only what it uses, inside its function: peak memory is measured per process,
# and a plain read should not pay for jax.


def write_checkpoint(directory: str, layers: int, dtype: str) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPE, "num_hidden_layers": layers,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
           "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2}
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    K = D // cfg["num_attention_heads"]
    N = cfg["num_key_value_heads"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)

    def tensors():
        yield "model.embed_tokens.weight", (V, D)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "self_attn.q_proj.weight", (D, D)
            yield p + "self_attn.k_proj.weight", (N * K, D)
            yield p + "self_attn.v_proj.weight", (N * K, D)
            yield p + "self_attn.o_proj.weight", (D, D)
            yield p + "mlp.gate_proj.weight", (F, D)
            yield p + "mlp.up_proj.weight", (F, D)
            yield p + "mlp.down_proj.weight", (D, F)
            yield p + "input_layernorm.weight", (D,)
            yield p + "post_attention_layernorm.weight", (D,)
        yield "model.norm.weight", (D,)
        yield "lm_head.weight", (V, D)

    os.makedirs(directory, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, shape in tensors():
        array = (rng.standard_normal(shape, np.float32) * 0.02).astype(np_dtype)
        if current and size + array.nbytes > 2 << 30:
            shards.append(current)
            current, size = {}, 0
        current[name], size = array, size + array.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
        total += sum(a.nbytes for a in shard.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def plain_read(directory: str) -> dict:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors import safe_open

    start, total = time.perf_counter(), 0
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="numpy") as f:
            for name in f.keys():
                total += f.get_tensor(name).nbytes
    return {"seconds": time.perf_counter() - start, "bytes": total}


def import_params(directory: str, dtype: str) -> dict:
    import jax

    from jaxllm import config as config_lib
    from jaxllm import sharding
    from jaxllm.interop import hf

    with open(os.path.join(directory, "config.json")) as f:
        model = hf.model_config(json.load(f), base=config_lib.ModelConfig(param_dtype=dtype))
    cfg = config_lib.Config(model=model)
    mesh = sharding.make_mesh(cfg.mesh)
    start = time.perf_counter()
    params = jax.block_until_ready(hf.read_params(directory, cfg, mesh))
    return {"seconds": time.perf_counter() - start,
            "bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/jaxllm_llama_1b")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--phase", choices=["plain_read", "import"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        peak_anon = [0]  # resident memory not backed by files (the page cache of mapped files excluded)

        def sample():
            while True:
                with open("/proc/self/status") as f:
                    anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
                peak_anon[0] = max(peak_anon[0], anon * 1024)
                time.sleep(0.01)

        threading.Thread(target=sample, daemon=True).start()
        result = plain_read(args.dir) if args.phase == "plain_read" else import_params(args.dir, args.dtype)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_anon_rss_bytes"] = peak_anon[0]
        print(json.dumps(result))
        return
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_checkpoint(args.dir, args.layers, args.dtype)
    runs = {}
    for phase in ("plain_read", "import", "plain_read", "import"):  # alternated: page cache warm for both
        out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--dtype", args.dtype, "--phase", phase],
                             check=True, capture_output=True, text=True).stdout
        runs.setdefault(phase, []).append(json.loads(out.strip().splitlines()[-1]))
    read, imported = min(runs["plain_read"], key=lambda r: r["seconds"]), min(runs["import"], key=lambda r: r["seconds"])
    print(json.dumps({
        "checkpoint": args.dir, "dtype": args.dtype, "file_bytes": read["bytes"], "params_bytes": imported["bytes"],
        "plain_read_s": read["seconds"], "import_s": imported["seconds"],
        "import_over_read": imported["seconds"] / read["seconds"],
        "import_peak_rss_bytes": imported["peak_rss_bytes"],
        "peak_rss_over_params": imported["peak_rss_bytes"] / imported["bytes"],
        "import_peak_anon_rss_bytes": imported["peak_anon_rss_bytes"],
        "peak_anon_rss_over_params": imported["peak_anon_rss_bytes"] / imported["bytes"],
        "plain_read_peak_rss_bytes": read["peak_rss_bytes"],
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
