"""One run, one writer: the lock every process that writes into a workdir holds (training,
distillation students, soups, quantized, pruned and imported runs). Read-only tools take none.

The lock is the file <workdir>/workdir.lock, JSON naming its holder (host, pid, start time,
command). It is created atomically, complete (written to a private file, then hard-linked into
place; `O_EXCL` where the filesystem has no hard links), so on a filesystem shared by many hosts
exactly one creator wins. While held, a thread touches its modification time every HEARTBEAT_S
seconds. A lock is stale, and taken over with a warning, when
  - its holder ran on this host and that pid is no longer running, or
  - its holder ran on another host and its heartbeat is older than STALE_AFTER_S
    (the hosts' clocks must agree to well within that, as NTP keeps them).
A taker deletes a stale lock only while it holds a second, short-lived guard file, so two takers
never delete each other's fresh locks; then it creates the lock like anyone else. A holder whose
lock was taken over (it stalled past STALE_AFTER_S) stops at its next `check`, before it writes
again. In a multi-process run only process 0 holds the lock; the others learn its verdict through
one broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.config import ConfigError

LOCK_FILE = "workdir.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_ATTEMPTS = 40
_GUARD_STALE_S = 30.0  # a takeover takes milliseconds


class WorkdirInUse(ConfigError):
    """Another process writes into this workdir; the message names it and says how to proceed."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    command: str
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started} ({self.command})"


def lock_path(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _read(path: str) -> tuple[Holder | None, float | None]:
    """(holder, seconds since its last heartbeat); (None, None) if there is no lock file, (None,
    age) if it cannot be parsed (an `O_EXCL` creator between create and write, or damage)."""
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as f:
            return Holder(**json.load(f)), age
    except FileNotFoundError:
        return None, None
    except (ValueError, TypeError):
        return None, age


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    try:  # a killed process its parent has not reaped yet still answers signal 0
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class WorkdirLock:
    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.workdir, self.path = os.path.abspath(workdir), lock_path(workdir)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = Holder(host=socket.gethostname(), pid=os.getpid(),
                         started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                         command=" ".join(sys.argv)[:200], token=uuid.uuid4().hex)
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._lost: str | None = None
        self._made_dir = False

    def acquire(self) -> WorkdirLock:
        self._made_dir = not os.path.isdir(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(_ATTEMPTS):  # other processes may be creating or taking over the lock meanwhile
            if self._create(self.path):
                self._beater = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
                self._beater.start()
                return self
            holder, age = _read(self.path)
            if age is None:
                continue  # released between our create and read
            reason = self._stale_reason(holder, age)
            if reason is None:
                raise self._in_use(holder, age)
            if self._take_over(holder):
                who = holder.describe() if holder else "an unreadable lock file"
                print(f"warning: taking over the lock of {self.workdir} from {who}: {reason}", file=sys.stderr)
            else:
                time.sleep(0.05)  # another process is taking it over
        raise WorkdirInUse(f"could not take {self.path}: other processes keep taking it; retry")

    def _create(self, path: str) -> bool:
        """Creates `path` holding this process's record, atomically and complete; False if it exists."""
        tmp = f"{path}.{self.me.token}.tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self.me), f)
        try:
            os.link(tmp, path)
            return True
        except OSError as e:
            if os.stat(tmp).st_nlink == 2:
                return True  # NFS: the link was made but its reply was lost
            if isinstance(e, FileExistsError):
                return False
            return self._create_exclusive(path)  # no hard links on this filesystem
        finally:
            os.unlink(tmp)

    def _create_exclusive(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(dataclasses.asdict(self.me), f)
        return True

    def _stale_reason(self, holder: Holder | None, age: float) -> str | None:
        if holder is None:
            return f"unreadable and untouched for {age:.0f} s" if age > self.stale_after_s else None
        if holder.host == self.me.host:
            return None if _pid_running(holder.pid) else f"pid {holder.pid} is no longer running on this host"
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _take_over(self, stale: Holder | None) -> bool:
        """Deletes the stale lock; False if another process is taking it over. Takers first create
        a guard file, so the lock they delete is, for certain, the stale one they read (a fresh
        lock cannot replace it while it exists, and only a guard's holder deletes it)."""
        guard = self.path + ".takeover"
        if not self._create(guard):
            _, age = _read(guard)
            if age is not None and age > _GUARD_STALE_S:  # its taker died in the middle
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guard)
            return False
        try:
            current, _ = _read(self.path)
            if getattr(current, "token", None) != getattr(stale, "token", None):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        finally:
            os.unlink(guard)

    def _in_use(self, holder: Holder | None, age: float) -> WorkdirInUse:
        if holder is None:
            return WorkdirInUse(f"{self.workdir} is locked by an unreadable {self.path} (touched {age:.0f} s "
                                f"ago); if no run writes there, delete it and rerun")
        where = "" if holder.host == self.me.host else f" on {holder.host}"
        return WorkdirInUse(
            f"{self.workdir} is in use by another writer: {holder.describe()}, last heartbeat {age:.0f} s "
            f"ago. Wait for it to finish, stop it (kill {holder.pid}{where}), or use another workdir; "
            f"if it is gone, delete {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self.lost() is None:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def lost(self) -> str | None:
        """Who holds the lock now if this process lost it (None while it holds it); reads the file,
        so a takeover is seen at once."""
        if self._lost is None:
            holder, _ = _read(self.path)
            if holder is None or holder.token != self.me.token:
                self._lost = holder.describe() if holder else "nobody (the lock file was removed)"
        return self._lost

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        holder, _ = _read(self.path)
        if holder is not None and holder.token == self.me.token:
            os.unlink(self.path)
        if self._made_dir:  # a tool that failed before writing leaves no empty directory behind
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)


class HeldLock:
    """The lock as every process of a run sees it: `lock` is process 0's (None elsewhere)."""

    def __init__(self, workdir: str, lock: WorkdirLock | None):
        self.workdir, self.lock = workdir, lock

    def check(self) -> None:
        """Raises WorkdirInUse on every process if process 0 lost the lock (call it on all
        processes at the same points: in a multi-process run it is a collective)."""
        lost = self.lock.lost() if self.lock is not None else None
        if jax.process_count() > 1:
            if not multihost_utils.broadcast_one_to_all(np.int32(lost is not None)):
                return
        elif lost is None:
            return
        raise WorkdirInUse(f"stopping: the lock of {self.workdir} was taken over by {lost or 'another run'} "
                           "(this run stalled longer than the lock's stale timeout); no more writes from here")


# The locks this process holds, by workdir: a tool that holds one may call another that takes it
# again (main.run around train.train), without the inner call seeing itself as a second writer.
_HELD: dict[str, HeldLock] = {}


@contextlib.contextmanager
def hold(workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> Iterator[HeldLock]:
    """Holds `workdir`'s lock for the block (process 0 does; every process of the run calls this);
    raises WorkdirInUse on every process if another writer holds it."""
    key = os.path.abspath(workdir)
    if key in _HELD:
        yield _HELD[key]
        return
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir, heartbeat_s, stale_after_s).acquire()
        except Exception as e:  # any failure, so that the other processes are not left waiting
            refused = e
    if jax.process_count() > 1:
        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not taken and refused is None:
            refused = WorkdirInUse(f"process 0 could not take the lock of {key}; its error says why")
    if refused is not None:
        raise refused
    _HELD[key] = held = HeldLock(key, lock)
    try:
        yield held
    finally:
        del _HELD[key]
        if lock is not None:
            lock.release()


def holding(param: str) -> Callable[[Callable], Callable]:
    """Decorates a tool that writes a run directory: the call holds the lock of the workdir its
    argument `param` names, taken before the tool reads or computes anything."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with hold(signature.bind(*args, **kwargs).arguments[param]):
                return fn(*args, **kwargs)

        return locked

    return decorate
