"""The start-up timeline: seconds from this process's start to each stage of getting a model ready.

    timeline.mark("imports")                      # -> log line "start-up: imports at 3.12 s"
    timeline.mark("weights loaded", wall=t)       # a stage seen in vLLM's log, stamped when vLLM logged it
    timeline.marks()                              # {"imports": 3.1, ..., "ready": 57.9, "first token": 61.2}

One timeline a process (the app serves one engine); a restart of the engine starts it again from the restart.
The bench reads the log lines of the app arm, so every second of a start is accounted for the same way in
the app's log, the bench results and /status.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("startup")
LINE = "start-up: %s at %.2f s"  # bench.report parses these lines


def process_start() -> float:
    """Wall time at which this process started (the interpreter's own start, imports included)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil: from the first import of this module, which app.py does first thing
        return _IMPORTED


_IMPORTED = time.time()
_lock = threading.Lock()
_origin = process_start()
_marks: dict[str, float] = {}


def mark(name: str, wall: float | None = None) -> None:
    """Record the first time a stage is reached (later ones keep the first)."""
    if name in _marks:  # the hot path (a mark per streamed token): no lock once marked
        return
    with _lock:
        if name in _marks:
            return
        _marks[name] = round((wall if wall is not None else time.time()) - _origin, 2)
    log.info(LINE, name, _marks[name])


def marks() -> dict[str, float]:
    with _lock:
        return dict(sorted(_marks.items(), key=lambda item: item[1]))


def restart() -> None:
    """A new start of the engine: its stages count from now."""
    global _origin
    with _lock:
        _origin = time.time()
        _marks.clear()
