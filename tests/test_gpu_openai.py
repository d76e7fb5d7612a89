"""OpenAIEngine against a real `vllm serve` of the tiny Gemma 4, as the app talks to a DGX Spark.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu_openai.py -s` prints TTFT and tok/s.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import openai_backend
from engine.base import GenerationRequest, SamplingOptions, Stage
from engine.openai_backend import OpenAIEngine, chat_params
from engine.settings import EngineSettings
from tests.tiny_model import TOKEN_ID

pytestmark = pytest.mark.gpu

STARTUP_TIMEOUT_S = 600
MAX_TOKENS = 900  # with the prompt, within --max-model-len 1024


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def vllm_metric(root: str, name: str) -> float:
    """A gauge or counter from vLLM's Prometheus /metrics, summed over its labels."""
    text = http_get(f"{root}/metrics") or ""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` of the tiny model in a subprocess (eager, Triton attention, small context); yields its root URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_model_dir),  # `vllm serve`
        "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--attention-backend", "TRITON_ATTN",
        "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
        "--reasoning-parser", "gemma4",
        "--language-model-only",  # the text-only tiny build has no image processor
    ]  # fmt: skip
    root = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while http_get(f"{root}/health") is None:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not come up; its log:\n{log_path.read_text()[-5000:]}")
                time.sleep(1)
            yield root
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


async def started(root: str) -> OpenAIEngine:
    engine = OpenAIEngine(EngineSettings(model="tiny", backend="openai", base_url=f"{root}/v1"))
    await asyncio.to_thread(asyncio.run, engine.start())  # the app starts engines on their own loop
    assert engine.status().stage is Stage.READY and engine.served_model == "tiny"
    return engine


def chat(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], SamplingOptions(**sampling))


async def test_a_reply_streams_from_vllm_serve_with_client_side_metrics(vllm_server: str):
    engine = await started(vllm_server)
    [delta async for delta in engine.generate(chat("Hi", max_tokens=8))]  # warm-up
    deltas = [delta async for delta in engine.generate(chat("Tell me a story.", temperature=0.0, max_tokens=200))]
    metrics = deltas[-1].metrics
    assert deltas[-1].finish_reason in {"stop", "length"}
    assert metrics.output_tokens > 1 and metrics.prompt_tokens > 0  # from the usage chunk
    assert metrics.ttft_s > 0 and metrics.decode_tok_s > 0
    print(
        f"\nvllm serve (tiny, bf16) via OpenAIEngine: TTFT {metrics.ttft_s * 1000:.1f} ms, "
        f"{metrics.decode_tok_s:.0f} tok/s, {metrics.output_tokens} tokens, finish {deltas[-1].finish_reason}"
    )
    await engine.shutdown()


async def test_closing_the_stream_aborts_the_request_in_vllm(vllm_server: str, monkeypatch: pytest.MonkeyPatch):
    # The random tiny model ends its turn within tens of tokens; banning its end tokens keeps it talking,
    # so that only the client going away can end this request before max_tokens.
    def never_ending(request: GenerationRequest, model: str) -> dict:
        params = chat_params(request, model)
        params["logit_bias"] = {str(TOKEN_ID["<eos>"]): -100, str(TOKEN_ID["<turn|>"]): -100}
        return params

    monkeypatch.setattr(openai_backend, "chat_params", never_ending)
    engine = await started(vllm_server)
    generated_before = vllm_metric(vllm_server, "vllm:generation_tokens_total")
    stream = engine.generate(chat("Talk forever.", max_tokens=MAX_TOKENS))
    await anext(stream)
    await stream.aclose()  # the UI's stop button
    for _ in range(100):
        if vllm_metric(vllm_server, "vllm:num_requests_running") == 0:
            break
        await asyncio.sleep(0.05)
    generated = vllm_metric(vllm_server, "vllm:generation_tokens_total") - generated_before
    print(f"\nclosed after the first delta: vLLM generated {generated:.0f} of {MAX_TOKENS} tokens")
    assert vllm_metric(vllm_server, "vllm:num_requests_running") == 0
    assert generated < MAX_TOKENS
    await engine.shutdown()
