"""Load-time fixes for NVFP4 Gemma 4 checkpoints in vLLM, applied by the engine before vLLM loads one.

    notes = patches.apply(model_dir)  # what was patched and why; raises CheckpointError if it cannot load right
    EngineArgs(..., linear_backend=patches.linear_backend_from_env() or ...)

`apply` runs nvfp4.doctor on the checkpoint and asks the installed vLLM's own Gemma 4 loader code where
the per-expert keys land (patches.gemma4). What it can repair while the weights stream into vLLM (the
global scales of fused shards that differ, missing input scales, exactly castable dtypes, expert keys the
loader would drop) it installs as a wrapper around the model class's `load_weights`; anything else raises
CheckpointError carrying the doctor's report. The wrapper lives in this process: vLLM's engine gets it by
being forked from here (vLLM's default, VLLM_WORKER_MULTIPROC_METHOD=fork) or by running in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), not when spawned.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nvfp4 import doctor
from nvfp4.layout import Checkpoint

log = logging.getLogger("patches")
_plan: _Plan | None = None  # what the wrapped load_weights does; None passes the weights through


class CheckpointError(RuntimeError):
    """The checkpoint would load wrong and cannot be repaired on the way in; the message is the doctor's report."""


@dataclass
class _Plan:
    ckpt: Checkpoint
    report: doctor.Report
    rename: Callable[[str], str] | None

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in doctor.repaired_tensors(self.ckpt, self.report, weights):
            yield (self.rename(key) if self.rename else key), tensor


def apply(model_dir: Path) -> list[str]:
    """Check the checkpoint and install what it needs; returns one line per patch (empty when none is needed)."""
    global _plan
    _plan = None
    model_dir = Path(model_dir)
    if not _is_nvfp4(model_dir):
        return []
    report = doctor.diagnose(model_dir)
    blocking = [f for f in report.findings if not (f.repair and f.in_stream)]
    if blocking:
        raise CheckpointError(
            f"{report.text()}\n{len(blocking)} of these cannot be repaired while vLLM loads; write a repaired copy "
            f"with `python -m nvfp4.doctor {model_dir} --fix OUT` and load OUT"
        )
    lines = _summary(model_dir.name, report.findings)

    from patches import gemma4

    ckpt = Checkpoint(model_dir)
    rename = None
    try:
        unmapped = gemma4.unmapped_expert_keys(ckpt)
    except Exception as e:  # a vLLM whose loader code no longer fits the probe: load as is, and say so
        log.warning("could not check how this vLLM maps Gemma 4 expert keys: %r", e)
        unmapped = []
    if unmapped:
        if gemma4.unmapped_expert_keys(ckpt, gemma4.to_moe_experts):
            raise CheckpointError(f"this vLLM's Gemma 4 loader drops expert weights such as {unmapped[0]}")
        rename = gemma4.to_moe_experts
        lines.append(
            f"{model_dir.name}: this vLLM's Gemma 4 loader would drop {len(unmapped)} per-expert tensors "
            f"(e.g. {unmapped[0]}): renamed to `.moe.experts.<E>.` while loading"
        )
    if not lines:
        return []
    if (
        os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn"
        and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"
    ):
        raise CheckpointError(
            "the checkpoint needs load-time repairs, but VLLM_WORKER_MULTIPROC_METHOD=spawn starts vLLM's engine "
            "without them; unset it, or repair a copy with `python -m nvfp4.doctor --fix`"
        )
    _install(ckpt)
    _plan = _Plan(ckpt, report, rename)
    for line in lines:
        log.info(line)
    return lines


def _summary(name: str, findings: list[doctor.Finding], each: int = 3) -> list[str]:
    """One line per repair, or one per kind of repair when there are many (a 26B checkpoint can have thousands)."""
    by_kind: dict[str, list[doctor.Finding]] = {}
    for f in findings:
        by_kind.setdefault(f.kind, []).append(f)
    lines = []
    for kind, group in by_kind.items():
        if len(group) <= each:
            lines += [f"{name}: {f.module}: {f.message}; repaired while loading: {f.repair}" for f in group]
        else:
            f = group[0]
            lines.append(
                f"{name}: {len(group)} modules with {kind}, e.g. {f.module}: {f.message}; "
                f"repaired while loading: {f.repair}"
            )
    return lines


def _is_nvfp4(model_dir: Path) -> bool:
    """A ModelOpt NVFP4 config with weights to load (a dummy-weights folder has none to repair)."""
    config = model_dir / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.exists() else None
    legacy = model_dir / "hf_quant_config.json"
    if qc is None and legacy.exists():
        qc = json.loads(legacy.read_text())
    if not qc:
        return False
    algo = str(qc.get("quantization", qc).get("quant_algo", "")).upper()
    return "FP4" in algo and any(model_dir.glob("*.safetensors"))


def _install(ckpt: Checkpoint) -> None:
    """Wrap `load_weights` of the class vLLM builds for this checkpoint (once per process)."""
    from vllm.model_executor.models import gemma4, gemma4_mm

    arch = (ckpt.config.get("architectures") or [""])[0]
    cls = (
        gemma4_mm.Gemma4ForConditionalGeneration
        if arch == "Gemma4ForConditionalGeneration"
        else gemma4.Gemma4ForCausalLM
    )
    if getattr(cls.load_weights, "_nvfp4_wrapped", False):
        return
    original = cls.load_weights

    def load_weights(self, weights):
        return original(self, _plan.stream(weights) if _plan else weights)

    load_weights._nvfp4_wrapped = True
    cls.load_weights = load_weights


def linear_backend_from_env() -> str | None:
    """The seed's `VLLM_NVFP4_GEMM_BACKEND` (gone in vLLM 0.26) as a value for EngineArgs(linear_backend=...)."""
    value = os.environ.get("VLLM_NVFP4_GEMM_BACKEND", "").strip().lower().replace("-", "_")
    if not value:
        return None
    from typing import get_args

    from vllm.config.kernel import LinearBackend

    if value not in get_args(LinearBackend):
        raise ValueError(
            f"VLLM_NVFP4_GEMM_BACKEND={value!r} is not a vLLM linear backend: {', '.join(get_args(LinearBackend))}"
        )
    return value
