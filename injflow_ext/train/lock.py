"""One owner per run directory: ``RUN/train.lock`` names the host, process and SLURM job that
trains the run, from before its first write to its exit, so that a second ``injflow train``
(with ``--overwrite`` too) or a second ``--resume`` of the run is refused instead of writing the
same files.

A lock left by a process that died without removing it (SIGKILL, a crashed node) is stale and
taken over, with a message, when its owner is known to be gone: the same host and no such
process, or the same SLURM job (a requeued job). A lock from another host whose process cannot
be checked is not taken over; the message names the owner and the file to delete.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

__all__ = ["RunLock", "RunLocked"]


class RunLocked(RuntimeError):
    """Another process trains the run."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (see the module docstring);
    :class:`RunLocked` when another live process holds it."""

    NAME = "train.lock"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.NAME)
        self.held = False

    def owner(self) -> dict | None:
        """The lock's record, None when there is none (or it cannot be read)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict | None) -> str | None:
        """Why the lock's owner is gone, or None when it may be alive."""
        me = _me()
        if owner is None:
            return "it cannot be read"
        if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
            return f"process {owner.get('pid')} on {owner.get('host')} no longer exists"
        if me["slurm_job"] and owner.get("slurm_job") == me["slurm_job"] \
                and owner.get("pid") != me["pid"]:
            return f"it was taken by an earlier run of this SLURM job ({me['slurm_job']})"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(_me(), f)
        return True

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(2):
            if self._create():
                self.held = True
                return
            owner = self.owner()
            why = self._stale(owner)
            if why is None:
                since = time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.localtime(owner.get("since", 0)))
                job = f", SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else ""
                raise RunLocked(
                    f"{os.path.dirname(self.path)} is being trained by process {owner['pid']} on "
                    f"{owner['host']}{job} (since {since}); wait for it to end or stop it, or "
                    f"use another --out. If that process is gone (e.g. its node crashed), delete "
                    f"{self.path}")
            print(f"injflow train: taking over the stale lock {self.path}: {why}",
                  file=sys.stderr, flush=True)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        raise RunLocked(f"{self.path}: another process took the lock at the same time; "
                        f"{self.owner()}")

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner is not None and owner.get("pid") == os.getpid():
                os.remove(self.path)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
