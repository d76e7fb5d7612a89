"""Local chat app for Gemma 4 26B-A4B NVFP4: parse the flags, build the engine and the UI, serve.

The UI is up at once; the model loads in the background while the sidebar shows its progress.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from chat.history import DB_FILENAME, HistoryStore, default_data_dir
from chat.limits import Limits
from engine import timeline
from engine.base import EngineError
from engine.factory import create_engine
from engine.lifecycle import start_in_background
from engine.openai_server import ApiAccess, OpenAIServer, decide_access
from engine.settings import EngineSettings, add_flags, from_flags, positive

log = logging.getLogger("app")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASS, got {value!r}")
    return user, password


def _auth_file(value: str) -> list[tuple[str, str]]:
    """USER:PASS a line; blank lines and # comments are skipped."""
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"can't read {value}: {e.strerror}") from None
    logins = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                logins.append(_auth(line.strip()))
            except argparse.ArgumentTypeError:
                raise argparse.ArgumentTypeError(f"{value} line {number}: expected USER:PASS") from None
    if not logins:
        raise argparse.ArgumentTypeError(f"{value} holds no USER:PASS line")
    return logins


def _api_key(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a key, got an empty one")
    return value.strip()


def _api_key_file(value: str) -> str:
    """The key is FILE's first line that is not blank."""
    try:
        lines = Path(value).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"can't read {value}: {e.strerror}") from None
    key = next((line.strip() for line in lines if line.strip()), "")
    if not key:
        raise argparse.ArgumentTypeError(f"{value} holds no key")
    return key


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected 0 or a positive whole number, got {value!r}")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with Gemma 4 26B-A4B NVFP4 in the browser, with live time-to-first-token and tok/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve the UI on (0.0.0.0: whole network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve the UI on")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument(
        "--auth", type=_auth, action="append", metavar="USER:PASS", help="require this login; repeat for more users"
    )
    p.add_argument("--auth-file", type=_auth_file, metavar="FILE", help="require a login: USER:PASS lines of FILE")
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        type=_api_key,
        metavar="KEY",
        help="require this key on the OpenAI-compatible API (/v1, /health) as `Authorization: Bearer KEY`; "
        "without one /v1 is off under --share, --auth or a --host other than loopback",
    )
    key.add_argument("--api-key-file", type=_api_key_file, metavar="FILE", help="as --api-key, the key read from FILE")
    p.add_argument("--no-api", action="store_true", help="don't serve the OpenAI-compatible API (/v1, /health)")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where the chat history (SQLite) is kept")
    limits = Limits()
    p.add_argument(
        "--max-queue",
        type=positive(int),
        default=limits.max_queue,
        help="requests waiting their turn; more are refused",
    )
    p.add_argument(
        "--rate-limit",
        type=_count,
        default=limits.rate_per_minute,
        help="messages a browser session may send a minute; 0: no limit",
    )
    p.add_argument(
        "--max-upload-mb", type=positive(float), default=limits.max_upload_mb, help="largest file one may upload"
    )
    p.add_argument("--desktop", action="store_true", help="open the app in a native window (needs pywebview)")
    p.add_argument("--no-browser", action="store_true", help="don't open a browser tab")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log verbosity")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> EngineSettings:
    return from_flags(ns)


def logins(ns: argparse.Namespace) -> list[tuple[str, str]] | None:
    return [*(ns.auth or []), *(ns.auth_file or [])] or None


def api_access(ns: argparse.Namespace) -> ApiAccess:
    """Who may call /v1 (engine.openai_server.decide_access has the rules)."""
    key = ns.api_key or ns.api_key_file
    return decide_access(key=key, no_api=ns.no_api, host=ns.host, share=ns.share, login=logins(ns) is not None)


SHARE_WITHOUT_AUTH = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  --share without --auth: ANYONE who gets the public link can use this app and your GPU.
!!  Add --auth USER:PASS (or --auth-file FILE) to require a login.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests, one line each
    timeline.mark("imports")
    settings = settings_from_args(ns)
    try:
        engine = create_engine(settings)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    try:
        store = HistoryStore(ns.data_dir / DB_FILENAME)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        print(f"error: can't open the chat history in {ns.data_dir}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("chat history: %s", store.path)
    # The model loads while Gradio is imported and the page is built: the load is what people wait for.
    start_in_background(engine)

    from chat.desktop import open_window  # here: gradio takes seconds to import, --help needn't wait
    from chat.status import EngineView
    from chat.ui import TITLE, build_ui, launch_options

    timeline.mark("gradio imported")
    limits = Limits(max_queue=ns.max_queue, rate_per_minute=ns.rate_limit, max_upload_mb=ns.max_upload_mb)
    view = EngineView(engine)  # the sidebar's and /status's
    api = OpenAIServer(engine, api_access(ns))  # /v1 and /health on the page's port, over the same engine
    demo = build_ui(engine, settings, store, limits, view)
    demo.queue(default_concurrency_limit=settings.max_num_seqs, max_size=limits.max_queue)
    auth = logins(ns)
    if ns.share and not auth:
        print(SHARE_WITHOUT_AUTH, file=sys.stderr, flush=True)
    # SIGTERM stops the server like Ctrl+C does, so the engine below is shut down (vLLM's engine process too).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(
            server_name=ns.host,
            server_port=ns.port,
            inbrowser=not ns.no_browser and not ns.desktop,
            share=ns.share,
            auth=auth,
            max_file_size=int(limits.max_upload_mb * 2**20),
            prevent_thread_lock=True,
            **api.launch_options(launch_options(view)),
        )
        timeline.mark("page served")
        if ns.share and not demo.share_url:
            log.warning(
                "could not open a share link (no internet, or gradio.live unreachable); serving locally only at %s",
                demo.local_url,
            )
        api.log_status(demo.local_url, demo.share_url)
        # A native window serves until it is closed; a browser tab (or none), until Ctrl+C or SIGTERM.
        if not (ns.desktop and open_window(demo.local_url, TITLE)):
            demo.block_thread()
    finally:
        demo.close()
        asyncio.run(engine.shutdown())
        store.close()


if __name__ == "__main__":
    main()
