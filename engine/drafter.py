"""Gemma 4's assistant models: small MTP drafters with which vLLM decodes several tokens a step.

Google publishes one assistant per Gemma 4 model (0.4 B parameters for 26B-A4B). It reads the target's KV
cache and last hidden state, so it fits only the model it was trained with; vLLM recognises it by its
model_type and runs it as MTP speculative decoding. Greedy output is unchanged up to rounding: every drafted
token is checked by the target model, and one step yields 1 to 1 + num_speculative_tokens tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.base import EngineError
from engine.model_source import Checkpoint, Progress, locate
from engine.settings import EngineSettings

log = logging.getLogger(__name__)

ASSISTANT_TYPES = {"gemma4_assistant", "gemma4_unified_assistant"}
# The target's text model (hidden_size, num_hidden_layers) -> its published assistant.
PUBLISHED = {
    (2816, 30): "google/gemma-4-26B-A4B-it-assistant",
    (5376, 60): "google/gemma-4-31B-it-assistant",
    (2560, 42): "google/gemma-4-E4B-it-assistant",
    (1536, 35): "google/gemma-4-E2B-it-assistant",
}


def text_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return config.get("text_config") or config


def published_assistant(target: Path) -> str | None:
    text = text_config(target)
    return PUBLISHED.get((text.get("hidden_size"), text.get("num_hidden_layers")))


def check(drafter: Path, target: Path, *, weights: bool = True) -> None:
    """A Gemma 4 assistant trained for this target's hidden size, or an EngineError saying what is wrong."""
    try:
        config = json.loads((drafter / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{drafter} has no readable config.json: {e}") from e
    if config.get("model_type") not in ASSISTANT_TYPES:
        raise EngineError(f"{drafter} is a {config.get('model_type')!r} model, not a Gemma 4 assistant (MTP drafter).")
    hidden = text_config(target).get("hidden_size")
    if config.get("backbone_hidden_size") != hidden:
        raise EngineError(
            f"{drafter} drafts for a model of hidden size {config.get('backbone_hidden_size')}; "
            f"this model's is {hidden}: use the assistant published with this model."
        )
    if weights and not any(drafter.glob("*.safetensors")):
        raise EngineError(f"{drafter} has no *.safetensors weights.")


def resolve(settings: EngineSettings, target: Checkpoint, progress: Progress, notes: list[str]) -> Path | None:
    """The drafter's folder, or None for one token a step.

    An explicit --draft-model that can't be used is an error; "auto" falls back to plain decoding with a note.
    """
    wanted = settings.draft_model
    if wanted is None or wanted.lower() == "none":
        return None
    auto = wanted == "auto"
    if auto:
        wanted = published_assistant(target.path)
        if wanted is None:
            return None  # no assistant is published for this model
    try:
        folder = locate(wanted, progress, flag="--draft-model")
        check(folder, target.path, weights=settings.load_format != "dummy")
    except EngineError as e:
        if not auto:
            raise
        log.warning("MTP drafter %s unavailable: %s", wanted, e)
        notes.append(f"no MTP drafter ({wanted} unavailable): one token a step; --draft-model DIR to give one")
        return None
    notes.append(f"MTP drafter {wanted}: up to {settings.num_speculative_tokens} extra tokens a step")
    return folder


def speculative_config(folder: Path, settings: EngineSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"model": str(folder), "num_speculative_tokens": settings.num_speculative_tokens}
    if settings.synthetic_acceptance:
        config["rejection_sample_method"] = "synthetic"
        config["synthetic_acceptance_rates"] = list(settings.synthetic_acceptance)
    return config
