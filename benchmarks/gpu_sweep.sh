#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent single-GPU machine with jax[cuda] but no
# tensorflow-datasets: install the wheels in .whl/ (if any) to /tmp/site, then run the attention
# core (XLA vs cuDNN), the train step (tiny, d512, small; small again with cuDNN attention) and
# decoding. JSON lines go to $OUT (or runs/gpu_sweep) and to the console.
#
#     bash benchmarks/gpu_sweep.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_sweep}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/gpu.txt"

timeout 100 python3 benchmarks/attention.py --config small --blocks 1,4 --dtype bfloat16 --cudnn \
  --rounds 20 2>>"$out/stderr.txt" | tee "$out/attention.jsonl"
timeout 220 python3 benchmarks/train_throughput.py --configs tiny,d512,small --steps 10 \
  2>>"$out/stderr.txt" | tee "$out/train.jsonl"
timeout 100 python3 benchmarks/train_throughput.py --configs small --steps 10 \
  --set model.attention_impl=cudnn 2>>"$out/stderr.txt" | tee "$out/train_cudnn.jsonl"
timeout 160 python3 benchmarks/decode.py --train_steps 100 --repeats 3 --eval_batches 4 \
  2>>"$out/stderr.txt" | tee "$out/decode.jsonl"
grep -v "^WARNING\|^I0000\|^W0000" "$out/stderr.txt" | tail -n 30
