"""One run, one writer (training/workdir_lock.py): a second trainer on a workdir exits at once with
a one-line error and the run equals an uninterrupted one; stale locks (dead pid here, silent
heartbeat elsewhere, unreadable and old) are taken over; of many racing creators or takers exactly
one wins, with or without hard links; every tool that writes a run directory refuses a locked one;
a run killed mid-append (lock and metrics line left behind) plots and resumes into the
uninterrupted run; SIGTERM releases the lock."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import plots
from jaxllm.cli import plot as plot_cli
from jaxllm.cli import prune as prune_cli
from jaxllm.cli import quantize as quantize_cli
from jaxllm.combine import soup
from jaxllm.interop import hf
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train
from jaxllm.training import workdir_lock as wl
from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
TIMING_KEYS = ("step_time_s", "tokens_per_s", "mfu")


def _write_lock(workdir, host, pid, age_s=0.0):
    os.makedirs(workdir, exist_ok=True)
    path = wl.lock_path(workdir)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC", "command": "python other.py",
                   "token": f"{host}-{pid}"}, f)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def _holder_token(workdir):
    with open(wl.lock_path(workdir)) as f:
        return json.load(f)["token"]


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_named_in_one_line_and_a_dead_one_is_taken_over(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    here = socket.gethostname()
    _write_lock(workdir, here, os.getppid())  # alive: the process that started the tests
    with pytest.raises(wl.WorkdirInUse) as e:
        wl.WorkdirLock(workdir).acquire()
    message = str(e.value)
    assert "\n" not in message
    assert f"pid {os.getppid()} on host {here}" in message and "2026-01-01 00:00:00 UTC" in message
    assert wl.lock_path(workdir) in message

    dead = _dead_pid()
    _write_lock(workdir, here, dead)
    lock = wl.WorkdirLock(workdir).acquire()
    assert f"pid {dead} is no longer running" in capsys.readouterr().err
    assert _holder_token(workdir) == lock.me.token
    lock.release()
    assert os.listdir(workdir) == []


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_is_old(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    _write_lock(workdir, "node-b", 1234, age_s=wl.STALE_AFTER_S - 60)
    with pytest.raises(wl.WorkdirInUse, match="pid 1234 on host node-b.*kill 1234 on node-b"):
        wl.WorkdirLock(workdir).acquire()
    _write_lock(workdir, "node-b", 1234, age_s=wl.STALE_AFTER_S + 60)
    lock = wl.WorkdirLock(workdir).acquire()
    assert "heartbeat is" in capsys.readouterr().err
    lock.release()


def test_an_unreadable_lock_is_respected_until_it_is_old(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(wl.lock_path(workdir), "w") as f:
        f.write('{"host": "node-')
    with pytest.raises(wl.WorkdirInUse, match="unreadable.*delete it"):
        wl.WorkdirLock(workdir).acquire()
    old = time.time() - wl.STALE_AFTER_S - 60
    os.utime(wl.lock_path(workdir), (old, old))
    wl.WorkdirLock(workdir).acquire().release()
    assert "from an unreadable lock file" in capsys.readouterr().err


def test_without_hard_links_an_exclusive_create_takes_the_lock(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")  # what filesystems without hard links say

    monkeypatch.setattr(os, "link", no_links)
    workdir = str(tmp_path / "run")
    lock = wl.WorkdirLock(workdir).acquire()
    assert _holder_token(workdir) == lock.me.token
    with pytest.raises(wl.WorkdirInUse, match=f"pid {os.getpid()}"):
        wl.WorkdirLock(workdir).acquire()
    lock.release()
    assert not os.path.exists(workdir)


def test_the_heartbeat_refreshes_the_lock_and_a_holder_that_lost_it_stops(tmp_path):
    workdir = str(tmp_path / "run")
    lock = wl.WorkdirLock(workdir, heartbeat_s=0.02).acquire()
    held = wl.HeldLock(workdir, lock)
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.time() + 10
    while os.stat(lock.path).st_mtime == old and time.time() < deadline:
        time.sleep(0.01)
    assert time.time() - os.stat(lock.path).st_mtime < 10
    held.check()

    _write_lock(workdir, "node-b", 99)  # what a taker on another host leaves
    while lock.lost() is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(wl.WorkdirInUse, match="taken over by pid 99 on host node-b"):
        held.check()
    lock.release()
    assert _holder_token(workdir) == "node-b-99"  # the new holder's lock stays


@pytest.mark.parametrize("stale", [False, True])
def test_of_many_racing_writers_exactly_one_takes_the_lock(tmp_path, stale):
    workdir = str(tmp_path / "run")
    if stale:
        _write_lock(workdir, socket.gethostname(), _dead_pid())
    barrier, results = threading.Barrier(8), []

    def contend():
        lock = wl.WorkdirLock(workdir)
        barrier.wait()
        try:
            results.append(lock.acquire())
        except wl.WorkdirInUse:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [lock for lock in results if lock is not None]
    assert len(winners) == 1
    assert _holder_token(workdir) == winners[0].me.token
    winners[0].release()


@pytest.mark.parametrize("tool", ["quantize", "soup", "soup_last", "prune", "hf_import", "hf_export"])
def test_every_tool_that_writes_a_run_directory_refuses_a_locked_one(tmp_path, tool):
    out = str(tmp_path / "out")
    source = str(tmp_path / "source")  # never read: the lock is taken first
    _write_lock(out, socket.gethostname(), os.getppid())
    call = {
        "quantize": lambda: quantize_cli.quantize_workdir(source, out),
        "soup": lambda: soup.make_soup([source, source], out),
        "soup_last": lambda: soup.average_last(source, out, 2),
        "prune": lambda: prune_cli.prune_checkpoint(source, out, ["sparsity=0.5"]),
        "hf_import": lambda: hf.import_checkpoint(source, out),
        "hf_export": lambda: hf.export_checkpoint(source, out),
    }[tool]
    with pytest.raises(wl.WorkdirInUse, match=f"pid {os.getppid()}"):
        call()
    assert os.listdir(out) == [wl.LOCK_FILE]


# --- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(workdir, data_dir):
    cfg = tiny_config(workdir=str(workdir))
    return dataclasses.replace(
        cfg,
        mesh=C.MeshConfig(data=2, fsdp=4),
        data=dataclasses.replace(cfg.data, data_dir=data_dir),
        train=dataclasses.replace(cfg.train, steps=STEPS, eval_every=1000),
        checkpoint=C.CheckpointConfig(every=2, keep=5),
    )


def _trainer_command(workdir, data_dir):
    """The same run from the command line."""
    return [sys.executable, os.path.join(ROOT, "experiments", "tiny_lm.py"), f"workdir={workdir}",
            f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=32", "model.d_model=64",
            "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=128",
            "train.log_every=1", "train.progress_bar=false", "sample_tokens=0",
            "mesh.data=2", "mesh.fsdp=4", f"data.data_dir={data_dir}"]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _checkpoints(workdir, s):
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), read_only=True)
    try:
        steps = checkpointer.all_steps()
        return steps, jax.device_get(checkpointer.restore(s.abstract_state)[0])
    finally:
        checkpointer.close()


def _assert_same_run(workdir, reference):
    assert _records(workdir) == _records(reference)
    cfg = C.from_dict(C.Config, C.read_config_json(workdir))
    assert dataclasses.replace(cfg, workdir=reference) == C.from_dict(C.Config, C.read_config_json(reference))
    s = train.setup(cfg)
    (steps, state), (ref_steps, ref_state) = _checkpoints(workdir, s), _checkpoints(reference, s)
    assert steps == ref_steps == [2, 4]
    jax.tree.map(np.testing.assert_array_equal, state, ref_state)
    assert not os.path.exists(wl.lock_path(workdir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    train.train(_config(workdir, data_dir))
    return workdir


def test_a_second_trainer_exits_at_once_and_the_run_equals_an_uninterrupted_one(tmp_path, data_dir, reference):
    workdir = str(tmp_path / "run")
    second = []

    def start_second_trainer(record):
        if not second:  # while this run holds the lock, in the middle of its steps
            second.append(subprocess.run(_trainer_command(workdir, data_dir), capture_output=True, text=True,
                                         timeout=300, cwd=ROOT))

    train.train(_config(workdir, data_dir), log=start_second_trainer)
    result = second[0]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {workdir} is in use by another writer: pid {os.getpid()} on host "
                               f"{socket.gethostname()}, started ")
    _assert_same_run(workdir, reference)


class _Stop(Exception):
    pass


def test_a_run_killed_mid_append_plots_and_resumes_into_the_uninterrupted_run(tmp_path, data_dir, reference, capsys):
    workdir = str(tmp_path / "run")
    cfg = _config(workdir, data_dir)

    def stop_at_step_3(record):
        if record["step"] == 3:
            raise _Stop  # after step 2's checkpoint, before step 3's line is written

    with pytest.raises(_Stop):
        train.train(cfg, log=stop_at_step_3)
    # A writer that holds the lock and is killed while appending step 3's record.
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from jaxllm.training import workdir_lock as wl; wl.WorkdirLock(sys.argv[1]).acquire(); "
        "f = open(os.path.join(sys.argv[1], 'metrics.jsonl'), 'a'); f.write('{\"step\": 3, \"loss\": 5.4'); f.flush(); "
        "os.kill(os.getpid(), signal.SIGKILL)"), workdir], env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert killed.returncode == -signal.SIGKILL and os.path.exists(wl.lock_path(workdir))
    capsys.readouterr()

    assert [r["step"] for r in plots.read_metrics(workdir)] == [1, 2]
    plot_cli.main([workdir, "--out", str(tmp_path / "curves.png")])
    assert "line 3 (cut short)" in capsys.readouterr().err

    train.train(cfg)
    err = capsys.readouterr().err
    assert "no longer running" in err and "removed line 3 (cut short)" in err
    _assert_same_run(workdir, reference)


def test_a_trainer_stopped_by_sigterm_releases_its_lock(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    command = _trainer_command(workdir, data_dir) + ["train.steps=100000", "checkpoint.every=0"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    try:
        while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        assert os.path.exists(wl.lock_path(workdir))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.stderr.close()
    assert not os.path.exists(wl.lock_path(workdir))
