"""A fork-safe pool of helper threads for CPU passes over memory that release the GIL.

numpy's reductions and BLAS dot products drop the GIL, so a pass over gradients cut into
chunks can stream memory from several cores at once. The pool is created on first use, sized
by ``torch.get_num_threads()`` (the user's say on how many cores the CPU work may take), and
recreated in a child process after ``fork`` (a DataLoader worker), where the parent's threads
do not exist.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

import torch

_MAX_THREADS = 8  # memory bandwidth is saturated well before this
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _reset_after_fork() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads() -> int:
    """How many threads a CPU pass may use: ``torch.get_num_threads()``, at most the cores
    this process may run on, at most 8."""
    return max(1, min(torch.get_num_threads(), _cores(), _MAX_THREADS))


def _executor(helpers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < helpers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="gradguard")
            _pool_size = helpers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def run_indexed(n: int, work: Callable[[int], None], nthreads: int,
                context: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """Call ``work(j)`` for every j in ``range(n)``, on ``nthreads`` threads (the caller's
    included), each inside ``context()`` (e.g. numpy's thread-local ``errstate``). Items are
    handed out one at a time, so a core busy with other work simply takes fewer; each
    ``work(j)`` must write only its own outputs. Exceptions propagate."""
    if nthreads <= 1 or n <= 1:
        with context():
            for j in range(n):
                work(j)
        return
    counter = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        with context():
            for j in iter(lambda: next(counter), None):
                if j >= n:
                    return
                work(j)

    helpers = min(nthreads, n) - 1
    futures = [_executor(helpers).submit(drain) for _ in range(helpers)]
    try:
        drain()
    finally:
        # never return while a helper may still write into the caller's outputs
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
