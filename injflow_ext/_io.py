"""Atomic file writes: a crash or Ctrl-C never leaves a half-written checkpoint or report, and a
write that fails (a full disk, a file-size limit, a read-only folder) is one :class:`WriteError`
that names the file, the system's error and what to do, with the previous file intact."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile

import torch

__all__ = ["WriteError", "atomic_torch_save", "atomic_json", "atomic_text", "writing"]

_ADVICE = {
    errno.ENOSPC: "free space on that file system, or write the run elsewhere (--out)",
    errno.EDQUOT: "you are over your disk quota there: free space, or write the run elsewhere "
                  "(--out)",
    errno.EFBIG: "the file would exceed the file-size limit (ulimit -f, or the file system's "
                 "maximum): raise the limit, or write the run elsewhere (--out)",
    errno.EACCES: "the folder is not writable for this user: fix its permissions, or write the "
                  "run elsewhere (--out)",
    errno.EPERM: "the folder is not writable for this user: fix its permissions, or write the "
                 "run elsewhere (--out)",
    errno.EROFS: "the file system is mounted read-only: write the run elsewhere (--out)",
}


class WriteError(OSError):
    """A file could not be written; the message says which, why and what to do."""

    def __str__(self) -> str:
        return self.strerror


def _write_error(path: str, exc: OSError) -> WriteError:
    code = exc.errno
    name = errno.errorcode.get(code, "unknown error") if code is not None else "unknown error"
    advice = _ADVICE.get(code, "check the folder and the file system, or write the run "
                               "elsewhere (--out)")
    return WriteError(code, f"could not write {path}: {exc.strerror or exc} ({name}); {advice}. "
                            "Files written before are intact")


@contextlib.contextmanager
def writing(path: str):
    """Turn an OSError of the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise _write_error(path, exc) from None


def _atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and a rename: the old
    file stays whole until the new one is complete on disk."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` atomically (serialised in memory first, so that a failing write is the
    system's error, not torch's)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic(path, buffer.getvalue())


def atomic_text(text: str, path: str) -> None:
    _atomic(path, text.encode())


def atomic_json(obj, path: str) -> None:
    _atomic(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)
