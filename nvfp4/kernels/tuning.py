"""Measured kernel configs per GPU: nvfp4/kernels/tuned/<gpu-slug>.json, written by `python -m bench.kernels
--write-configs` on that GPU and read once per process by `gemv.gemv_config` / `moe.moe_config`.

The file holds {"gemv": {"N_pad,K_pad,block_m": {config}}, "moe": {"K,I_pad,top_k,block_m": {config}}, ...};
a config is a GemvConfig / MoeConfig as a dict (unknown keys are ignored, so an older or newer file still loads).
NVFP4_TUNED=off ignores the files, NVFP4_TUNED=PATH reads that file instead of the current GPU's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("nvfp4.kernels")

TUNED_DIR = Path(__file__).resolve().with_name("tuned")
T = TypeVar("T")


def gpu_slug(name: str | None) -> str:
    """As bench.report.gpu_slug: "NVIDIA H200" -> "h200"."""
    if not name:
        return "nogpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def current_gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # no driver: no GPU
        return None


def path_for(gpu: str | None) -> Path:
    return TUNED_DIR / f"{gpu_slug(gpu)}.json"


def load(gpu: str | None) -> dict[str, Any]:
    """The measured configs of the GPU named `gpu` ({} when there is no file or no GPU), or NVFP4_TUNED's."""
    setting = os.environ.get("NVFP4_TUNED", "")
    if setting.lower() in ("off", "0", "none"):
        return {}
    if not setting and gpu is None:
        return {}
    path = Path(setting) if setting else path_for(gpu)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


@cache
def tuned() -> dict[str, Any]:
    """The current GPU's measured configs, read once per process (where the kernels run: it asks CUDA)."""
    return load(None if os.environ.get("NVFP4_TUNED") else current_gpu())


def reload() -> None:
    tuned.cache_clear()
    lookup.cache_clear()


def from_dict(cls: type[T], entry: Any) -> T | None:
    """A config dataclass from a file entry, None if it is not a dict or does not build (bad values)."""
    if not isinstance(entry, dict):
        return None
    kinds = {f.name: type(f.default) for f in fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in entry.items() if k in kinds}
    if any(type(v) is not kinds[k] for k, v in known.items()):  # ints are ints, flags are bools (not 0 / 1)
        return None
    try:
        return cls(**known)
    except (TypeError, ValueError):
        return None


@cache
def lookup(section: str, key: tuple[int, ...], cls: type[T]) -> T | None:
    """The entry for `key` in `section`, else the one of the nearest block_m (key[-1]) with the same other fields:
    the shape decides a config far more than the token count does."""
    entries = tuned().get(section)
    if not isinstance(entries, dict):
        return None
    exact = from_dict(cls, entries.get(",".join(map(str, key))))
    if exact is not None:
        return exact
    near = []
    for name, entry in entries.items():
        try:
            other = tuple(int(v) for v in name.split(","))
        except ValueError:
            continue
        if len(other) == len(key) and other[:-1] == key[:-1]:
            near.append((abs(other[-1].bit_length() - key[-1].bit_length()), -other[-1], entry))
    for _, _, entry in sorted(near, key=lambda t: t[:2]):
        config = from_dict(cls, entry)
        if config is not None:
            return config
    return None
