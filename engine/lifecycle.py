"""Starting and restarting the engine on a thread of its own, so the server never waits on a model load.

The UI follows along through engine.status(); a failed start or a dead engine shows there as FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from engine import timeline
from engine.base import Engine, EngineError

log = logging.getLogger(__name__)

_restarting = threading.Lock()  # one restart at a time, however often the button is pressed


def _run(engine: Engine, restart: bool) -> None:
    async def go() -> None:
        if restart:
            log.info("restarting the engine")
            await engine.shutdown()
            timeline.restart()
        await engine.start()

    try:
        asyncio.run(go())
        log.info("the engine is ready: %s", engine.status().detail)
    except EngineError as e:
        log.error("the engine failed to start: %s", e)
    except Exception:
        log.exception("the engine failed to start")


def start_in_background(engine: Engine) -> threading.Thread:
    """Load the model on a daemon thread: Ctrl+C during a long load exits without waiting for it."""
    thread = threading.Thread(target=_run, args=(engine, False), name="engine-start", daemon=True)
    thread.start()
    return thread


def restarting() -> bool:
    return _restarting.locked()


def restart_in_background(engine: Engine) -> threading.Thread | None:
    """Shut the engine down and start it again; None when a restart is already under way."""
    if not _restarting.acquire(blocking=False):
        return None

    def run() -> None:
        try:
            _run(engine, restart=True)
        finally:
            _restarting.release()

    thread = threading.Thread(target=run, name="engine-restart", daemon=True)
    thread.start()
    return thread
