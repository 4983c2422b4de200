"""One live writer per (run folder, rank): a lock file that names its holder.

``writer-r{rank}.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and
on NFSv3+) and holds ``{"pid", "host", "start", "token", "time"}`` (``start``: the process start time). A lock is stale, and taken
over, when its holder is gone: on the same host, a pid that no longer exists (or was reused
by a process started later); in this process, no open writer holds it. A lock of another host
cannot be checked and is respected: the error says which file to delete if that writer is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from .errors import RunLockedError

#: Locks held by writers of this process: lock path -> token.
_HELD: dict[str, str] = {}
#: An unreadable lock younger than this is being written by its holder, not stale (seconds).
_FRESH_S = 10.0


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _key(path: Path) -> str:
    """The same lock however its folder was spelled (relative, absolute, through a link)."""
    return os.path.realpath(path)


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _stale(path: Path, info: dict[str, Any] | None) -> bool:
    if info is None:  # torn or being written right now
        try:
            return time.time() - path.stat().st_mtime > _FRESH_S
        except OSError:
            return True
    if info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return True
    if pid == os.getpid():
        return _HELD.get(_key(path)) != info.get("token")
    return not _alive(pid, info.get("start"))


class Lock:
    """The lock of one (folder, rank); :meth:`release` (or garbage collection, or interpreter
    exit) removes the file if it is still this lock's."""

    def __init__(self, path: Path):
        self.path = path
        self.token = uuid.uuid4().hex
        self._finalizer: weakref.finalize | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError` naming the live holder."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
                "token": self.token, "time": time.time()}
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if not _stale(self.path, holder):
                    who = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
                           else "a writer that is starting")
                    raise RunLockedError(
                        f"{self.path.parent} is being written by another live writer ({who}; "
                        f"lock file {self.path}). Two writers on one folder would overwrite each "
                        "other's shards: use another folder, mode='new' (a fresh versioned "
                        "folder), or delete the lock file if that writer is gone.") from None
                try:
                    os.unlink(self.path)  # stale: its holder is gone
                except FileNotFoundError:
                    pass
                continue
            try:
                os.write(fd, json.dumps(info).encode())
            finally:
                os.close(fd)
            _HELD[_key(self.path)] = self.token
            self._finalizer = weakref.finalize(self, _release, str(self.path), _key(self.path),
                                               self.token)
            return
        raise RunLockedError(f"{self.path}: could not take the writer lock (contended)")

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _release(path: str, key: str, token: str) -> None:
    if _HELD.get(key) == token:
        del _HELD[key]
    info = _holder(Path(path))
    if info is not None and info.get("token") == token:
        try:
            os.unlink(path)
        except OSError:
            pass


def live_lock(path: Path) -> bool:
    """True when ``path`` is a lock file of a writer that is still alive."""
    return path.exists() and not _stale(path, _holder(path))
