"""The real app.py in a subprocess on a tiny Gemma 4 (transformers backend), for the tests that drive it from
outside: through gradio_client or a browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from gradio_client import Client

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300
READY_LINE = "the engine is ready"  # engine.lifecycle's log line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endless_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint without end-of-turn ids: its random replies end only at max_tokens or when stopped."""
    if not out.exists():
        shutil.copytree(checkpoint, out)
        config_path = out / "generation_config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"eos_token_id": []}))
    return out


def unreachable_share_server(tmp: Path) -> dict[str, str]:
    """Environment for an app whose --share tunnel can't reach its server, as on a machine without internet.

    Gradio runs its frpc client from HF_HOME; this one prints what frpc prints when the server refuses the
    connection, so the test neither downloads frpc nor depends on the network being down.
    """
    from gradio.tunneling import BINARY_FILENAME

    home = tmp / "hf-home"
    frpc = home / "gradio" / "frpc" / BINARY_FILENAME
    frpc.parent.mkdir(parents=True, exist_ok=True)
    frpc.write_text("#!/bin/sh\necho 'login to server failed: dial tcp 127.0.0.1:9: connect: connection refused'\n")
    frpc.chmod(0o755)
    return {"HF_HOME": str(home), "GRADIO_SHARE_SERVER_ADDRESS": "127.0.0.1:9"}


class AppProcess:
    """`python app.py --backend transformers --model MODEL FLAGS...` on a free port, its output in `log`."""

    def __init__(self, model: Path, tmp: Path, *flags: str, env: dict[str, str] | None = None, port: int = 0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tmp / f"app-{self.port}.log"
        cmd = [sys.executable, "app.py", "--backend", "transformers", "--model", str(model)]
        cmd += ["--port", str(self.port), "--no-browser", *flags]
        if "--data-dir" not in flags:
            cmd += ["--data-dir", str(tmp / "data")]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **(env or {})}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, *lines: str) -> AppProcess:
        """Until the server answers, the engine has loaded and the log holds `lines` (the engine loads while the
        server starts, so either can come first)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.log_text()}")
            text = self.log_text()
            if all(line in text for line in (READY_LINE, "Running on local URL", *lines)):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the app was not ready after {STARTUP_TIMEOUT_S} s:\n{self.log_text()}")

    def client(self, auth: tuple[str, str] | None = None) -> Client:
        return Client(self.url, auth=auth, verbose=False)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
