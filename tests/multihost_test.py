"""Multi-host training on one machine: two processes with 4 CPU devices each (gloo collectives over
localhost) train like one process with 8; the checkpoint they write together restores in one
process; processes that disagree, or wait for a process that never comes, stop with a clear error.

Run as a script, this file is one such training process (see `_worker`).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
RUN_TIMEOUT_S = 240  # generous for a loaded 2-core machine; a healthy pair takes ~30 s


def _overrides(workdir, data_dir):
    return [
        f"workdir={workdir}", f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=32",
        "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=128", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
        "checkpoint.every=10", "checkpoint.keep=2", "train.progress_bar=false", "sample_tokens=0",
        "mesh.data=2", "mesh.fsdp=4", f"data.data_dir={data_dir}",
    ]


def _distributed(port, num_processes, process_id, timeout_s=60):
    return [
        f"distributed.coordinator_address=127.0.0.1:{port}",
        f"distributed.num_processes={num_processes}", f"distributed.process_id={process_id}",
        f"distributed.initialization_timeout_s={timeout_s}",
    ]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, lines=25):
    with open(path, errors="replace") as f:
        kept = [line for line in f if not line.startswith("[Gloo]")]  # one line per connection
    return "".join(kept[-lines:])


def _run_processes(argvs, timeout_s):
    """Runs one child per argv (4 CPU devices each) until all exit; returns [(returncode, stderr
    tail)]. Children still running at the deadline are killed and the test fails with their logs."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    logs = tempfile.mkdtemp(prefix="multihost_logs_")
    procs, paths = [], []
    try:
        for i, argv in enumerate(argvs):
            paths.append(os.path.join(logs, f"process{i}.stderr"))
            with open(paths[-1], "w") as err:  # a file, not a pipe: a full pipe would block the child
                procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                              env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if any(p.poll() is None for p in procs):
            pytest.fail(f"processes still running after {timeout_s} s; stderr tails:\n"
                        + "\n".join(f"--- process {i} ---\n{_tail(p)}" for i, p in enumerate(paths)))
        return [(p.returncode, _tail(path)) for p, path in zip(procs, paths)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def _check_all_succeeded(results):
    failed = [(i, rc, tail) for i, (rc, tail) in enumerate(results) if rc != 0]
    assert not failed, "\n".join(f"process {i} exited with {rc}; stderr tail:\n{tail}" for i, rc, tail in failed)


def _losses(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def _tiny_lm_config(overrides):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import tiny_lm
    finally:
        sys.path.pop(0)
    from jaxllm import main

    return main.parse(tiny_lm.get_config, overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The dataset built once here, so the children never race to build it."""
    from jaxllm import data

    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = _tiny_lm_config(_overrides("unused", path))
    data.train_batches(cfg), data.eval_batches(cfg)
    return path


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path, data_dir, monkeypatch):
    import jax

    from jaxllm.training import checkpoint as ckpt
    from jaxllm.training import train

    two = str(tmp_path / "two_processes")
    port = _free_port()
    _check_all_succeeded(_run_processes(
        [_overrides(two, data_dir) + _distributed(port, 2, i) for i in range(2)], RUN_TIMEOUT_S))

    # The reference: this (single) process with its 8 devices, on the same data=2 x fsdp=4 mesh.
    one = str(tmp_path / "one_process")
    monkeypatch.setattr(train, "peak_flops_total", lambda: 1.0)  # skip the ~13 s matmul timing
    cfg = _tiny_lm_config(_overrides(one, data_dir))
    reference = jax.device_get(train.train(cfg))

    losses_two, losses_one = _losses(two), _losses(one)
    print("per-step loss, two processes:", losses_two, "\nper-step loss, one process: ", losses_one)
    assert list(losses_two) == list(losses_one) == list(range(1, STEPS + 1))
    # Not bit-identical: gloo sums the partial gradients of the two processes in another order.
    np.testing.assert_allclose(list(losses_two.values()), list(losses_one.values()), rtol=1e-5)
    np.testing.assert_allclose(_losses(two, "eval_loss")[STEPS], _losses(one, "eval_loss")[STEPS], rtol=1e-5)

    s = train.setup(cfg)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(two), read_only=True)
    try:
        restored, meta = checkpointer.restore(s.abstract_state)
    finally:
        checkpointer.close()
    restored = jax.device_get(restored)
    assert int(restored.step) == STEPS and meta["data_step"] == STEPS
    # Exactly what the two processes held at the end ...
    with np.load(os.path.join(two, "final_params.npz")) as saved:
        flat = jax.tree_util.tree_flatten_with_path(restored.params)[0]
        assert sorted(saved.files) == sorted(jax.tree_util.keystr(p) for p, _ in flat)
        for path, value in flat:
            np.testing.assert_array_equal(value, saved[jax.tree_util.keystr(path)])
    # ... and, up to that summation order, what one process trains.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), restored, reference)


def test_processes_that_share_the_batch_each_read_all_of_it(tmp_path, data_dir, monkeypatch):
    """tensor=2 spans the two processes (expert=4, a batch axis outside MoE layers, lies within
    each): both hold every row of the batch, so each reads all of it, and the pair trains like one
    process on the same mesh. The end-of-run sample is skipped with a note, not an error."""
    from jaxllm.training import train

    mesh = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2", "mesh.expert=4", "train.steps=2"]
    two, port = str(tmp_path / "two_processes"), _free_port()
    results = _run_processes(
        [_overrides(two, data_dir) + mesh + ["sample_tokens=5"] + _distributed(port, 2, i)
         for i in range(2)], RUN_TIMEOUT_S)
    _check_all_succeeded(results)
    assert "no sample in a multi-process run" in results[0][1], results[0][1]

    one = str(tmp_path / "one_process")
    monkeypatch.setattr(train, "peak_flops_total", lambda: 1.0)
    train.train(_tiny_lm_config(_overrides(one, data_dir) + mesh))
    losses_two, losses_one = _losses(two), _losses(one)
    assert list(losses_two) == list(losses_one) == [1, 2]
    np.testing.assert_allclose(list(losses_two.values()), list(losses_one.values()), rtol=1e-5)
    assert _losses(two, "tokens") == _losses(one, "tokens")


def test_processes_with_different_configs_stop_with_a_clear_error(tmp_path, data_dir):
    port, workdir = _free_port(), str(tmp_path / "run")
    steps = ["train.steps=5", "train.steps=6"]
    results = _run_processes(
        [_overrides(workdir, data_dir) + _distributed(port, 2, i) + [steps[i]] for i in range(2)], 60)
    for i, (rc, tail) in enumerate(results):
        assert rc != 0, f"process {i} succeeded despite the mismatch:\n{tail}"
        assert "disagree" in tail and "train.steps: process 0 has 5, process 1 has 6" in tail, tail


def test_a_locked_workdir_stops_every_process_with_a_clear_error(tmp_path, data_dir):
    """Process 0 alone checks the workdir lock (held here by this test's process); all stop."""
    from jaxllm.training import workdir_lock

    port, workdir = _free_port(), str(tmp_path / "run")
    lock = workdir_lock.WorkdirLock(workdir).acquire()
    try:
        results = _run_processes([_overrides(workdir, data_dir) + _distributed(port, 2, i) for i in range(2)], 60)
    finally:
        lock.release()
    assert results[0][0] == results[1][0] == 2, results
    assert f"error: {workdir} is in use by another writer: pid {os.getpid()}" in results[0][1], results[0][1]
    assert "process 0 could not take the lock" in results[1][1], results[1][1]
    assert not os.path.exists(workdir)  # the lock removes the directory it made, if nothing was written


def test_a_missing_process_is_a_clear_error_within_the_timeout(tmp_path, data_dir):
    port, workdir = _free_port(), str(tmp_path / "run")
    start = time.monotonic()
    # Process 0 of 2, and process 1 never starts.
    ((rc, tail),) = _run_processes([_overrides(workdir, data_dir) + _distributed(port, 2, 0, timeout_s=2)], 60)
    assert rc == 2, tail
    assert "did not start within distributed.initialization_timeout_s=2" in tail, tail
    assert time.monotonic() - start < 30


def test_which_environments_start_multi_process_jax():
    from jaxllm import distributed as dist
    from jaxllm.config import ConfigError, DistributedConfig

    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    default = DistributedConfig()
    assert dist.reason_to_initialize(default, {}) is None
    assert dist.reason_to_initialize(default, {**slurm, "SLURM_NTASKS": "1"}) is None
    assert "SLURM" in dist.reason_to_initialize(default, {**slurm, "SLURM_NTASKS": "2"})
    assert dist.reason_to_initialize(default, {"JAX_COORDINATOR_ADDRESS": "h:1"}) is not None
    assert dist.reason_to_initialize(default, {"TPU_WORKER_HOSTNAMES": "a,b"}) is not None
    assert dist.reason_to_initialize(default, {"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert dist.reason_to_initialize(DistributedConfig(auto=True), {}) == "distributed.auto=true"
    forced_single = DistributedConfig(num_processes=1)
    assert dist.reason_to_initialize(forced_single, {**slurm, "SLURM_NTASKS": "2"}) is None
    with pytest.raises(ConfigError, match="process_id=2 is out of range"):
        dist._validate(DistributedConfig(num_processes=2, process_id=2))
    with pytest.raises(ConfigError, match="needs a port"):
        dist._validate(DistributedConfig(coordinator_address="host"))


def _worker(argv):
    """One training process: `main.run` of tiny_lm, plus two test-only changes: no peak-FLOP/s
    timing (13 s of matmuls per process on a 2-core CPU, and only MFU uses it), and the final
    params gathered from all processes and saved by process 0 (for the exact restore check)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import tiny_lm

    from jax.experimental import multihost_utils

    from jaxllm import main
    from jaxllm.training import train

    train.peak_flops_total = lambda: 1.0
    real_train = train.train

    def train_and_save_params(cfg, *args, **kwargs):
        import jax

        state = real_train(cfg, *args, **kwargs)
        params = multihost_utils.process_allgather(state.params, tiled=True)  # a collective
        if jax.process_index() == 0:
            flat = jax.tree_util.tree_flatten_with_path(params)[0]
            np.savez(os.path.join(cfg.workdir, "final_params.npz"),
                     **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
        return state

    train.train = train_and_save_params
    main.run(tiny_lm.get_config, argv)


if __name__ == "__main__":
    _worker(sys.argv[1:])
