"""Find the checkpoint: a local folder or a hub id (downloaded with progress), then check it is Gemma 4."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.base import EngineError

log = logging.getLogger(__name__)

GEMMA4_ARCHITECTURES = {"Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"}
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
Progress = Callable[[float | None, str], None]  # (fraction done or None, what is happening)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    architecture: str
    quant_algo: str | None  # "NVFP4" for the ModelOpt checkpoint, None for BF16
    has_vision: bool  # a vision tower and the processor files that image and video prompts need
    context_length: int  # the text model's max_position_embeddings
    router_shape: tuple[int, int] | None = None  # (hidden size, experts) of the MoE router; None: no experts

    @property
    def nvfp4(self) -> bool:
        return self.quant_algo == "NVFP4"


def resolve(model: str, progress: Progress = lambda fraction, detail: None, *, weights: bool = True) -> Checkpoint:
    """`weights=False` accepts a folder without weights (vLLM's load_format="dummy" makes random ones)."""
    return inspect(locate(model, progress), weights=weights)


def locate(model: str, progress: Progress, flag: str = "--model") -> Path:
    """The folder of a local checkpoint, or of a hub id once downloaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise EngineError(f"{flag} {model!r} is neither a checkpoint folder nor a hub id like 'org/name'.")
    return download(model, progress, flag)


def download(repo_id: str, progress: Progress, flag: str = "--model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    progress(None, f"fetching {repo_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo_id, tqdm_class=_reporting_tqdm(progress)))
    except RepositoryNotFoundError as e:
        raise EngineError(
            f"{repo_id} was not found on the Hugging Face hub (or needs a token: `hf auth login`)."
        ) from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise EngineError(
            f"Could not download {repo_id}: the hub is unreachable and no complete copy is cached ({e}). "
            "Download it on a connected machine (`hf download " + repo_id + " --local-dir DIR`) and start "
            f"the app with {flag} DIR."
        ) from e


def _reporting_tqdm(progress: Progress):
    """A tqdm class for snapshot_download that forwards its byte counters to `progress`."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class ReportingTqdm(hf_tqdm):
        # Counts by itself: a disabled tqdm (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) keeps no counters.
        def __init__(self, *args, **kwargs):
            self.counts_bytes = kwargs.get("unit") == "B"
            self.done = kwargs.get("initial") or 0
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self.done += n or 0
            total = getattr(self, "total", None)
            if self.counts_bytes and total:
                progress(min(self.done / total, 1.0), f"downloading {self.done / 2**30:.2f} of {total / 2**30:.2f} GiB")
            return super().update(n)

    return ReportingTqdm


def inspect(path: Path, *, weights: bool = True) -> Checkpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EngineError(f"{path} has no config.json: point --model at a Hugging Face checkpoint folder.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{config_file} is unreadable: {e}") from e
    architectures = set(config.get("architectures") or [])
    if not architectures & GEMMA4_ARCHITECTURES:
        raise EngineError(
            f"{path} holds {sorted(architectures) or 'an unknown architecture'}; this app serves Gemma 4 "
            f"({', '.join(sorted(GEMMA4_ARCHITECTURES))})."
        )
    quant = config.get("quantization_config")
    quant_algo = None
    if quant is not None:
        method, quant_algo = quant.get("quant_method"), quant.get("quant_algo")
        if method != "modelopt" or quant_algo != "NVFP4":
            raise EngineError(
                f"{path} is quantized as {method}/{quant_algo}; this app serves BF16 or ModelOpt NVFP4 Gemma 4."
            )
    if weights and not any(path.glob("*.safetensors")):
        raise EngineError(f"{path} has no *.safetensors weights.")
    text = config.get("text_config") or config
    experts = text.get("num_experts") if text.get("enable_moe_block", True) else None
    return Checkpoint(
        path=path,
        architecture=sorted(architectures & GEMMA4_ARCHITECTURES)[0],
        quant_algo=quant_algo,
        has_vision=config.get("vision_config") is not None and any((path / f).is_file() for f in PROCESSOR_FILES),
        context_length=int(text.get("max_position_embeddings", 0)),
        router_shape=(int(text["hidden_size"]), int(experts)) if experts else None,
    )
