"""The sidebar's live numbers are the ones a client measures: the bench's app arm on the full 26B-A4B shapes.

Run on the device machine: `python -m pytest -m gpu tests/test_gpu_bench.py -s`. Set GPU_TEST_COMPILE_CACHE
to a folder to reuse vLLM's compile cache between runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.05


def test_the_sidebar_agrees_with_the_bench_within_5_percent(tmp_path):
    cache = os.environ.get("GPU_TEST_COMPILE_CACHE") or str(tmp_path / "cache")
    # A 2048-token prompt: a TTFT of a realistic chat turn; 1000 tokens out for the decode rate.
    cmd = [
        sys.executable, "-m", "bench", "--dummy", "--configs", "app:nvfp4", "--prompt-lens", "2048",
        "--output-lens", "1000", "--concurrency", "1", "--ttft-samples", "5", "--out", str(tmp_path / "out"),
        "--logs", str(tmp_path / "logs"), "--compile-cache", cache,
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=900)
    (results_file,) = (tmp_path / "out").glob("*.json")
    agreement = json.loads(results_file.read_text())["sidebar_vs_client"]
    print(f"\nsidebar / client: TTFT {agreement['ttft_ratios']}, decode {agreement['decode_ratios']}")
    assert len(agreement["ttft_ratios"]) >= 6 and agreement["decode_ratios"]
    assert agreement["max_deviation"] <= TOLERANCE
