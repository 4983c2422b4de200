"""Notices: how the Monitor tells the user something, from whichever thread found it.

Two kinds of notice reach the training thread:

* failures (a full disk, a read-only folder, a sink or callback that raises): one
  ``RuntimeWarning`` per source for the whole run, and a line in ``notes`` (kept in
  ``meta["notes"]``); training continues (principle 4);
* detector events, queued by the host side of a flush: the rule's callback, then its action:
  ``"warn"`` is a ``RuntimeWarning`` rate-limited to one per ``warn_interval`` seconds per rule
  (the next one says how many were held back), ``"raise"`` an :class:`AnomalyError`.

Everything is queued and delivered in the training thread, at the next ``record`` (or at a
flush with ``wait``, or ``close``), so a warning raised as an error by a filter, or an
``AnomalyError``, surfaces in the user's loop and not on the writer thread. Warnings point at
the first frame outside gradguard (the user's ``guard.step(...)`` or ``monitor.record(...)``
line), whatever the depth of the call inside gradguard.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .detectors import AnomalyError

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# frames of the machinery that calls gradguard on the user's behalf (``Monitor.close`` runs
# through ``weakref.finalize``), skipped like gradguard's own
_SKIPPED = (_PACKAGE_DIR, os.path.abspath(weakref.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` called by this function's caller that points
    at the first frame outside the gradguard package (1 = the caller itself). At interpreter
    exit there may be no such frame: the outermost one is used."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the user's line (see ``user_stacklevel``)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


class Notices:
    """The queue of warnings, callbacks and raises, delivered in the training thread.

    Args:
        warn_interval: seconds between two warnings of the same rule.
        on_note: called (no argument) after a note is added, to write the meta; must not raise.
        in_worker: returns True on the thread that must not deliver (the writer thread).
    """

    def __init__(self, warn_interval: float, on_note: Callable[[], None] | None = None,
                 in_worker: Callable[[], bool] | None = None):
        self.warn_interval = float(warn_interval)
        self.notes: list[str] = []
        self.on_note = on_note
        self.in_worker = in_worker or (lambda: False)
        self._failed: set[str] = set()
        self._queue: deque[tuple[str, Any]] = deque()
        self._delivering = False
        self._last_warn: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def failed(self, source: str) -> bool:
        return source in self._failed

    def fail(self, source: str, exc: BaseException, message: str | None = None) -> None:
        """One warning per source, a note in the meta; never raises."""
        try:
            with self._lock:
                if source in self._failed:
                    return
                self._failed.add(source)
            msg = message or f"gradguard monitor: {source} failed ({exc!r}); training continues"
            if isinstance(exc, OSError) and exc.errno is not None and message is None:
                msg = (f"gradguard monitor: cannot write the run store ({os.strerror(exc.errno)}: "
                       f"{exc}); training continues, statistics of this flush are lost")
            self.note(msg)
            if not self.in_worker() and not self._delivering:
                self.deliver(allow_raise=False)
        except Exception:  # noqa: BLE001 - a notice must never take training down
            pass

    def note(self, msg: str, *, write: bool = True) -> None:
        """Add ``msg`` to the notes and queue it as a warning."""
        self.notes.append(msg)
        self._queue.append(("warn", msg))
        if write and self.on_note is not None:
            self.on_note()

    def event(self, detector: Any, event: dict[str, Any]) -> None:
        """Queue a detector's event for its callback and action."""
        self._queue.append(("event", (detector, event)))

    def deliver(self, allow_raise: bool = True) -> None:
        """Deliver what is queued, in this (the training) thread. An ``AnomalyError`` is raised
        when ``allow_raise``, otherwise turned into a warning (after training ended)."""
        if self._delivering:
            return
        self._delivering = True
        try:
            error = self._drain()
        finally:
            self._delivering = False
        if error is not None:
            if allow_raise:
                raise error
            warn(f"{error} (raised after training ended: reported only)")

    def _drain(self) -> AnomalyError | None:
        error: AnomalyError | None = None
        while self._queue:
            try:
                kind, item = self._queue.popleft()
            except IndexError:
                break
            if kind == "warn":
                warn(item)
                continue
            d, event = item
            if d.callback is not None:
                try:
                    d.callback(event)
                except Exception as exc:  # noqa: BLE001
                    self.fail(f"callback of {d.rule}", exc)
            if d.action == "warn":
                self._rate_limited(d.rule, event["message"])
            elif d.action == "raise" and error is None:
                error = AnomalyError(f"gradguard: {event['message']}", event)
        return error

    def _rate_limited(self, rule: str, message: str) -> None:
        now = time.monotonic()
        last = self._last_warn.get(rule)
        if last is None or now - last >= self.warn_interval:
            extra = self._suppressed.pop(rule, 0)
            tail = f" ({extra} more {rule} events since the last warning)" if extra else ""
            warn(f"gradguard: {message}{tail}")
            self._last_warn[rule] = now
        else:
            self._suppressed[rule] = self._suppressed.get(rule, 0) + 1
