"""Which backend serves: vLLM on an NVIDIA GPU, else a clear word naming the other two."""

import pytest

from engine.base import EngineError
from engine.factory import choose_backend, create_engine
from engine.settings import EngineSettings


def test_auto_picks_vllm_when_cuda_and_vllm_are_there():
    assert choose_backend(EngineSettings(), cuda=True, vllm=True) == "vllm"


def test_auto_with_a_base_url_talks_to_that_server():
    assert choose_backend(EngineSettings(base_url="http://127.0.0.1:8000/v1"), cuda=True, vllm=True) == "openai"


@pytest.mark.parametrize("cuda,vllm,reason", [(False, True, "no CUDA GPU"), (True, False, "vLLM is not installed")])
def test_auto_without_a_usable_vllm_names_the_alternatives(cuda, vllm, reason):
    with pytest.raises(EngineError) as error:
        choose_backend(EngineSettings(), cuda=cuda, vllm=vllm)
    assert reason in str(error.value)
    assert "--backend openai" in str(error.value) and "--backend transformers" in str(error.value)


def test_an_explicit_backend_is_kept():
    assert choose_backend(EngineSettings(backend="transformers"), cuda=True, vllm=True) == "transformers"


def test_an_unknown_backend_is_refused():
    with pytest.raises(EngineError, match="unknown backend 'tensorrt'"):
        create_engine(EngineSettings(backend="tensorrt"))
