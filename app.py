"""Local chat app for Gemma 4 26B-A4B NVFP4: parse the flags, build the engine and the UI, serve.

The UI is up at once; the model loads in the background while the sidebar shows its progress.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from engine.base import Engine, EngineError
from engine.factory import create_engine
from engine.settings import BACKENDS, EngineSettings

log = logging.getLogger("app")

LOG_LEVELS = ("debug", "info", "warning", "error")


def _auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASS, got {value!r}")
    return user, password


def _max_model_len(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'auto', got {value!r}")
    return int(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = EngineSettings()
    p = argparse.ArgumentParser(
        prog="app.py",
        description="Chat with Gemma 4 26B-A4B NVFP4 in the browser, with live time-to-first-token and tok/s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="hub id or local directory (the served model name for openai)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help="auto: vLLM on an NVIDIA GPU")
    p.add_argument("--base-url", default=d.base_url, help="OpenAI-compatible server, e.g. http://spark:8000/v1")
    p.add_argument("--api-key", default=d.api_key, help="API key for --base-url")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the UI on (0.0.0.0: whole network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve the UI on")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    p.add_argument(
        "--auth", type=_auth, action="append", metavar="USER:PASS", help="require this login; repeat for more users"
    )
    p.add_argument(
        "--max-model-len",
        type=_max_model_len,
        default=d.max_model_len,
        help="context length in tokens, lowered to what the KV cache holds; auto: the model's own",
    )
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, help="vLLM KV cache dtype")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="share of GPU memory vLLM may use",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=d.max_num_seqs,
        help="replies generated at once (also the UI's concurrency limit)",
    )
    p.add_argument(
        "--tensor-parallel-size", type=int, default=d.tensor_parallel_size, help="GPUs to split the model over"
    )
    p.add_argument("--quantization", default=d.quantization, help="vLLM quantization; None: read from the checkpoint")
    p.add_argument(
        "--moe-backend",
        default=d.moe_backend,
        help="MoE kernel; None: marlin without FP4 tensor cores, else vLLM's choice",
    )
    p.add_argument("--linear-backend", default=d.linear_backend, help="FP4 linear kernel; None: as for --moe-backend")
    p.add_argument(
        "--attention-backend", default=d.attention_backend, help="vLLM attention backend; None: vLLM's choice"
    )
    p.add_argument(
        "--load-format", default=d.load_format, help="vLLM weight loading; dummy: random weights of the model's shapes"
    )
    p.add_argument("--no-browser", action="store_true", help="don't open a browser tab")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log verbosity")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        model=ns.model,
        backend=ns.backend,
        base_url=ns.base_url,
        api_key=ns.api_key,
        max_model_len=ns.max_model_len,
        kv_cache_dtype=ns.kv_cache_dtype,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        max_num_seqs=ns.max_num_seqs,
        tensor_parallel_size=ns.tensor_parallel_size,
        quantization=ns.quantization,
        moe_backend=ns.moe_backend,
        linear_backend=ns.linear_backend,
        attention_backend=ns.attention_backend,
        load_format=ns.load_format,
    )


def start_in_background(engine: Engine) -> None:
    """Load the model on a thread of its own; the UI follows along through engine.status()."""

    def load() -> None:
        try:
            asyncio.run(engine.start())
        except EngineError as e:
            log.error("the engine failed to start: %s", e)
        except Exception:
            log.exception("the engine failed to start")

    # A daemon, so Ctrl+C during a long load exits without waiting for it.
    threading.Thread(target=load, name="engine-start", daemon=True).start()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    ns = parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests, one line each
    settings = settings_from_args(ns)
    try:
        engine = create_engine(settings)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    from chat.ui import build_ui, launch_options  # here: gradio takes seconds to import, --help needn't wait

    demo = build_ui(engine, settings)
    start_in_background(engine)
    demo.queue(default_concurrency_limit=settings.max_num_seqs)
    # SIGTERM stops the server like Ctrl+C does, so the engine below is shut down (vLLM's engine process too).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(
            server_name=ns.host,
            server_port=ns.port,
            inbrowser=not ns.no_browser,
            share=ns.share,
            auth=ns.auth,
            **launch_options(),
        )
    finally:
        asyncio.run(engine.shutdown())


if __name__ == "__main__":
    main()
