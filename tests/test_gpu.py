"""engine.gpu picks the GPU that CUDA will use, by NVML index."""

import pynvml
import pytest

from engine.gpu import visible_gpu


@pytest.mark.parametrize("visible,index", [(None, 0), ("2", 2), ("3,1", 3), ("GPU-0e0d7847", 0)])
def test_the_first_visible_gpu_is_the_one_asked_for(monkeypatch, visible, index):
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpu() == ("handle", index)
