"""MTP speculative decoding: which Gemma 4 assistant drafts for which model, and what vLLM is given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from vllm.config import ParallelConfig

from bench.checkpoints import write_assistant_checkpoint, write_full_size_checkpoint
from engine import drafter, model_source
from engine.base import EngineError
from engine.settings import EngineSettings
from engine.vllm_launch import GpuFacts, engine_args

HOPPER = GpuFacts((9, 0), "NVIDIA H100")


def resolve(settings: EngineSettings, target: Path, notes: list[str] | None = None) -> Path | None:
    checkpoint = model_source.inspect(target, weights=settings.load_format != "dummy")
    return drafter.resolve(settings, checkpoint, lambda fraction, detail: None, [] if notes is None else notes)


def test_an_explicit_drafter_for_the_tiny_model_is_checked_and_used(tiny_model_dir, tiny_assistant_dir):
    notes = []
    settings = EngineSettings(draft_model=str(tiny_assistant_dir))
    assert resolve(settings, tiny_model_dir, notes) == tiny_assistant_dir
    assert any("MTP drafter" in n for n in notes)


def test_no_drafter_when_switched_off_or_none_is_published(tiny_model_dir):
    assert resolve(EngineSettings(draft_model=None), tiny_model_dir) is None
    assert resolve(EngineSettings(draft_model="none"), tiny_model_dir) is None
    notes = []
    assert resolve(EngineSettings(draft_model="auto"), tiny_model_dir, notes) is None  # no assistant for it
    assert notes == []


def test_auto_picks_the_published_assistant_and_falls_back_when_it_cannot_be_fetched(
    tmp_path, tiny_vision_model_dir, offline_hub
):
    target = write_full_size_checkpoint(tmp_path / "26b", tokenizer_from=tiny_vision_model_dir, nvfp4=True)
    assert drafter.published_assistant(target) == "google/gemma-4-26B-A4B-it-assistant"
    settings = EngineSettings(draft_model="auto", load_format="dummy")
    notes = []
    assert resolve(settings, target, notes) is None
    assert any("google/gemma-4-26B-A4B-it-assistant unavailable" in n for n in notes)

    # Once in the hub cache (an earlier download), the assistant is found offline too.
    snapshot = offline_hub / "models--google--gemma-4-26B-A4B-it-assistant" / "snapshots" / ("0" * 40)
    write_assistant_checkpoint(snapshot, target=target)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert resolve(settings, target) == snapshot


def test_an_explicit_drafter_that_cannot_be_used_is_an_error(tmp_path, tiny_model_dir, tiny_assistant_dir):
    with pytest.raises(EngineError, match="not a Gemma 4 assistant"):
        resolve(EngineSettings(draft_model=str(tiny_model_dir)), tiny_model_dir)
    wrong = shutil.copytree(tiny_assistant_dir, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "backbone_hidden_size": 2816}))
    with pytest.raises(EngineError, match="hidden size 2816"):
        resolve(EngineSettings(draft_model=str(wrong)), tiny_model_dir)
    with pytest.raises(EngineError, match="neither a checkpoint folder nor a hub id"):
        resolve(EngineSettings(draft_model="./missing"), tiny_model_dir)


def test_vllm_runs_the_assistant_as_mtp_with_the_apps_settings(tiny_model_dir, tiny_assistant_dir):
    settings = EngineSettings(model=str(tiny_model_dir), max_model_len=4096, num_speculative_tokens=3)
    target = model_source.inspect(tiny_model_dir)
    args = engine_args(settings, target, HOPPER, [], tiny_assistant_dir)
    spec = args.create_speculative_config(args.create_model_config(), ParallelConfig())
    assert spec.method == "mtp" and spec.num_speculative_tokens == 3
    assert spec.draft_model_config.architecture == "Gemma4MTPModel"
    assert spec.rejection_sample_method == "standard"  # real acceptance: every drafted token is checked
    assert args.attention_backend == "TRITON_ATTN"  # what vLLM's Gemma 4 drafter can share the KV cache with
    assert engine_args(settings, target, HOPPER, []).speculative_config is None


def test_benchmarks_on_random_weights_can_stand_in_acceptance_rates(tiny_model_dir, tiny_assistant_dir):
    settings = EngineSettings(model=str(tiny_model_dir), max_model_len=4096, synthetic_acceptance=(0.77, 0.55))
    args = engine_args(settings, model_source.inspect(tiny_model_dir), HOPPER, [], tiny_assistant_dir)
    spec = args.create_speculative_config(args.create_model_config(), ParallelConfig())
    assert spec.rejection_sample_method == "synthetic"
    assert spec.synthetic_acceptance_rates == [0.77, 0.55]


def test_the_full_size_assistant_config_is_what_vllm_expects(tmp_path, tiny_vision_model_dir):
    target = write_full_size_checkpoint(tmp_path / "26b", tokenizer_from=tiny_vision_model_dir, nvfp4=True)
    assistant = write_assistant_checkpoint(tmp_path / "assistant", target=target)
    drafter.check(assistant, target, weights=False)
    settings = EngineSettings(model=str(target), max_model_len=4096, load_format="dummy")
    args = engine_args(settings, model_source.inspect(target, weights=False), HOPPER, [], assistant)
    spec = args.create_speculative_config(args.create_model_config(), ParallelConfig())
    text = spec.draft_model_config.hf_config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (1024, 4, 8192)
    assert spec.draft_model_config.get_hidden_size() == 2816  # the target's: the assistant reads its hidden state
