"""Multi-process start-up: `jax.distributed.initialize` when the config or the launcher asks for
it, then a check that every process runs the same config.

Every host of a TPU pod slice, every task of a SLURM job, runs the same command; JAX then sees all
devices of all processes, and each process feeds only its own devices. This must run before
anything touches a JAX backend (the device list is fixed when the first backend starts).

When is a run multi-process?
  - distributed.coordinator_address / num_processes / process_id set: those values, the rest
    detected by JAX;
  - distributed.auto=true: everything detected by JAX (Cloud TPU metadata, SLURM, Open MPI, ...);
  - otherwise, when the environment shows a multi-process launch: $JAX_COORDINATOR_ADDRESS, an
    `srun` step with more than one task, an Open MPI `mpirun` with more than one rank, or a TPU
    worker list with more than one host (GKE; TPU VMs reached with `gcloud ... ssh --worker=all`
    keep it in metadata, not the environment: pass distributed.auto=true there);
  - distributed.num_processes=1 forces a single process whatever the environment says.

Nothing here waits without a bound: connecting gives up after initialization_timeout_s, and JAX
stops every process once one has been silent for heartbeat_timeout_s.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import config as config_lib
from jaxllm.config import Config, ConfigError, DistributedConfig

# The variables JAX's SLURM detection needs (SLURM_STEP_NODELIST is set for srun job steps).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

# JAX's own connection deadline comes this much after ours, so ours (the clearer one) fires first.
_JAX_TIMEOUT_GRACE_S = 10


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, ""))
    except ValueError:
        return 0


def launcher_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """Names the multi-process launcher this process was started by, or None. Only launches of
    more than one process count, so a one-task SLURM job or a single TPU VM stays single-process."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "$JAX_COORDINATOR_ADDRESS"
    if all(v in environ for v in _SLURM_VARS) and _int(environ, "SLURM_NTASKS") > 1:
        return f"SLURM (srun, {environ['SLURM_NTASKS']} tasks)"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI (mpirun, {environ['OMPI_COMM_WORLD_SIZE']} ranks)"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if "," in environ.get(name, ""):
            return f"TPU pod slice (${name})"
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice ($MEGASCALE_COORDINATOR_ADDRESS)"
    return None


def _explicit(d: DistributedConfig) -> bool:
    return bool(d.coordinator_address) or d.num_processes > 1 or d.process_id >= 0


def reason_to_initialize(d: DistributedConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this run starts jax.distributed ("distributed.* in the config", "distributed.auto",
    a launcher name), or None for a plain single-process run."""
    if d.num_processes == 1:
        return None
    if _explicit(d):
        return "distributed.* in the config"
    if d.auto:
        return "distributed.auto=true"
    return launcher_from_environment(environ)


def _validate(d: DistributedConfig) -> None:
    if d.num_processes < 0:
        raise ConfigError(f"distributed.num_processes={d.num_processes} must be positive (0 = detect)")
    if d.process_id < -1:
        raise ConfigError(f"distributed.process_id={d.process_id} must be >= 0 (-1 = detect)")
    if d.num_processes and d.process_id >= d.num_processes:
        raise ConfigError(
            f"distributed.process_id={d.process_id} is out of range for "
            f"distributed.num_processes={d.num_processes}: ids are 0..{d.num_processes - 1}"
        )
    if d.coordinator_address and ":" not in d.coordinator_address:
        raise ConfigError(
            f"distributed.coordinator_address={d.coordinator_address!r} needs a port, e.g. "
            f"{d.coordinator_address}:1234"
        )
    for name in ("initialization_timeout_s", "heartbeat_timeout_s"):
        if getattr(d, name) <= 0:
            raise ConfigError(f"distributed.{name} must be positive, got {getattr(d, name)}")


def maybe_initialize(cfg: Config) -> bool:
    """Starts jax.distributed if this run is multi-process and checks that all processes agree on
    the config. Returns whether the run is multi-process. Call before any other JAX use."""
    d = cfg.distributed
    _validate(d)
    reason = reason_to_initialize(d)
    if reason is None:
        return False
    # Cross-process collectives of the CPU backend (CI runs and CPU clusters); recent JAX versions
    # default to gloo, older ones to none, under which a multi-process CPU run cannot communicate.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not jax.distributed.is_initialized():
        _initialize(d, reason)
    check_processes_agree(cfg)
    return True


def _initialize(d: DistributedConfig, reason: str) -> None:
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(detected)"
    count = d.num_processes or "(detected)"
    pid = d.process_id if d.process_id >= 0 else "(detected)"
    where = f"coordinator {address}, {count} processes, this is process {pid}; started by {reason}"
    # When a process is missing JAX does not raise: its client aborts the whole process with an
    # RPC deadline message. A watchdog that fires a little earlier exits with a message that says
    # what to check instead.
    connected = threading.Event()

    def give_up_unless_connected():
        if not connected.wait(d.initialization_timeout_s):
            print(
                f"error: multi-process JAX did not start within distributed.initialization_timeout_s="
                f"{d.initialization_timeout_s} ({where}). Check that every process was started, all "
                "with the same distributed.num_processes and coordinator address and distinct "
                "process ids, and that process 0's host and port are reachable from all hosts",
                file=sys.stderr, flush=True,
            )
            os._exit(2)

    threading.Thread(target=give_up_unless_connected, daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address or None,
            num_processes=d.num_processes or None,
            process_id=d.process_id if d.process_id >= 0 else None,
            initialization_timeout=d.initialization_timeout_s + _JAX_TIMEOUT_GRACE_S,
            heartbeat_timeout_seconds=d.heartbeat_timeout_s,
        )
    except (ValueError, TypeError) as e:  # JAX could not work out the address, count or id
        raise ConfigError(
            f"cannot start multi-process JAX ({where}): {e}. Set distributed.coordinator_address, "
            "distributed.num_processes and distributed.process_id, or distributed.num_processes=1 "
            "for a single process"
        ) from e
    except RuntimeError as e:
        if "must be called before" in str(e):  # a backend had already started
            raise ConfigError(
                "jax.distributed must start before any JAX computation; call "
                "jaxllm.distributed.maybe_initialize(cfg) first thing"
            ) from e
        raise
    finally:
        connected.set()


def _fingerprint(cfg: Config) -> dict:
    """The config as every process must have it: all of it except this process's own id."""
    values = config_lib.to_dict(cfg)
    values["distributed"].pop("process_id")
    return values


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def describe_differences(reference: dict, other: dict, name: str) -> list[str]:
    """'key: process 0 has A, process 1 has B' for each dotted key whose values differ."""
    a, b = _flatten(reference), _flatten(other)
    return [
        f"{key}: process 0 has {a.get(key, '(missing)')!r}, {name} has {b.get(key, '(missing)')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def check_processes_agree(cfg: Config) -> None:
    """Every process sends the others its config and local device count (two tiny all-gathers);
    a difference raises ConfigError on every process alike, so none is left waiting in a
    collective that the others never reach."""

    mine = json.dumps(_fingerprint(cfg), sort_keys=True).encode()
    sizes = multihost_utils.process_allgather(
        np.array([len(mine), jax.local_device_count()], np.int64)
    )  # [processes, 2]
    padded = np.zeros(int(sizes[:, 0].max()), np.uint8)
    padded[: len(mine)] = np.frombuffer(mine, np.uint8)
    texts = multihost_utils.process_allgather(padded)  # [processes, longest]
    configs = [json.loads(bytes(texts[p, : sizes[p, 0]])) for p in range(len(sizes))]

    problems = []
    expected = cfg.distributed.num_processes
    if expected and jax.process_count() != expected:
        problems.append(
            f"distributed.num_processes={expected} but {jax.process_count()} processes joined"
        )
    for p in range(1, len(configs)):
        problems += describe_differences(configs[0], configs[p], f"process {p}")
    device_counts = sizes[:, 1].tolist()
    if len(set(device_counts)) > 1:
        problems.append(f"local device counts differ between processes: {device_counts}")
    if problems:
        raise ConfigError(
            f"the {len(configs)} processes of this run disagree (every process must run the same "
            "command and config; only distributed.process_id may differ): " + "; ".join(problems)
        )
