"""Where the checkpoint comes from: a folder, or the hub (with progress, and a clear word when offline)."""

import json
import shutil

import pytest

from engine import model_source
from engine.base import EngineError


def test_a_local_gemma4_folder_is_inspected(tiny_model_dir):
    checkpoint = model_source.resolve(str(tiny_model_dir))
    assert checkpoint.path == tiny_model_dir
    assert checkpoint.architecture == "Gemma4ForConditionalGeneration"
    assert checkpoint.quant_algo is None and not checkpoint.nvfp4
    assert checkpoint.context_length > 0


def copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_another_architecture_is_refused_by_name(tiny_model_dir, tmp_path):
    folder = copy_with_config(tiny_model_dir, tmp_path / "llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(EngineError, match="LlamaForCausalLM.*Gemma 4"):
        model_source.resolve(str(folder))


def test_an_unsupported_quantization_is_refused(tiny_model_dir, tmp_path):
    folder = copy_with_config(tiny_model_dir, tmp_path / "awq", quantization_config={"quant_method": "awq"})
    with pytest.raises(EngineError, match="awq"):
        model_source.resolve(str(folder))


def test_a_folder_without_config_says_what_is_missing(tmp_path):
    with pytest.raises(EngineError, match="no config.json"):
        model_source.resolve(str(tmp_path))


def test_a_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(EngineError, match="neither a checkpoint folder nor a hub id"):
        model_source.resolve(str(tmp_path / "missing" / "model"))


def test_offline_without_a_cached_copy_explains_how_to_use_a_local_folder(offline_hub):
    with pytest.raises(EngineError) as error:
        model_source.resolve("bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4")
    assert "--model DIR" in str(error.value)
    assert "hf download bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4" in str(error.value)


def test_a_cached_hub_copy_resolves_offline(offline_hub, tiny_model_dir):
    revision = "0" * 40
    repo = offline_hub / "models--org--tiny-gemma4"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    checkpoint = model_source.resolve("org/tiny-gemma4")
    assert checkpoint.path == repo / "snapshots" / revision
    assert checkpoint.architecture == "Gemma4ForConditionalGeneration"


def test_download_progress_reports_bytes_as_a_fraction():
    seen = []
    bar_class = model_source._reporting_tqdm(lambda fraction, detail: seen.append((fraction, detail)))
    bar = bar_class(total=4 * 2**30, unit="B", disable=True)
    bar.update(2**30)
    bar.update(3 * 2**30)
    assert [fraction for fraction, _ in seen] == [0.25, 1.0]
    assert seen[-1][1] == "downloading 4.00 of 4.00 GiB"
