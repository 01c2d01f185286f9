#!/bin/bash
# A/B: old main (git worktree) and this branch, alternately, same machine, nothing else running.
PY=/work/main/.venv/bin/python
run() { # name dir args...
  local name=$1 dir=$2; shift 2
  (cd $dir && PYTHONPATH=$dir $PY "$@") > /tmp/ab/$name.json 2> /tmp/ab/$name.err
}
run tt_old1 /work/old_main benchmarks/train_throughput.py --configs d512
run tt_new1 /work/main benchmarks/train_throughput.py --configs d512
run tt_old2 /work/old_main benchmarks/train_throughput.py --configs d512
run tt_new2 /work/main benchmarks/train_throughput.py --configs d512
run moe_old /work/old_main benchmarks/moe_cost.py
run moe_new /work/main benchmarks/moe_cost.py
echo done > /tmp/ab/finished
