"""Shared fixtures: the tiny Gemma 4 checkpoints, built once per version of tiny_model.py, and skipping `gpu` tests
(the marker is registered in pyproject.toml) where torch sees no CUDA GPU."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILDER = Path(__file__).with_name("tiny_model.py")


def _cached_build(kind: str) -> Path:
    from tests.tiny_model import build_tiny_assistant, build_tiny_gemma4

    digest = hashlib.sha256(BUILDER.read_bytes()).hexdigest()[:16]
    final = ROOT / ".tiny" / digest / kind
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the cache and rename: an interrupted build leaves no half checkpoint, and of two
    # sessions building at once the loser just drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    if kind == "assistant":
        build_tiny_assistant(tmp)
    else:
        build_tiny_gemma4(tmp, vision=kind == "vision")
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp)
    return final


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return _cached_build("text")


@pytest.fixture(scope="session")
def tiny_vision_model_dir() -> Path:
    return _cached_build("vision")


@pytest.fixture(scope="session")
def tiny_assistant_dir() -> Path:
    """The tiny model's MTP drafter (a Gemma 4 assistant)."""
    return _cached_build("assistant")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No hub access, as on a machine without network, and an empty hub cache (returned)."""
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from engine.factory import cuda_available  # only when a gpu test was collected: torch costs seconds

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible to torch")
    for item in gpu_items:
        item.add_marker(skip)
