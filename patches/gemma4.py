"""What the installed vLLM's Gemma 4 loader does with checkpoint keys, found by running its own code on them.

vLLM loads Gemma 4 in two steps: the multimodal wrapper maps `model.language_model.*` to
`language_model.model.*` (`Gemma4ForConditionalGeneration.hf_to_vllm_mapper`), then
`Gemma4ForCausalLM.load_weights` renames keys in a generator (per-expert keys to `.moe.experts.<E>.` in
0.26, fused 3-D experts exploded per expert, k copied to v for k_eq_v layers) and hands them to
`Gemma4Model.load_weights`, which routes `experts.<E>.{gate,up,down}_proj.` to the FusedMoE parameters
`layers.<N>.moe.experts.routed_experts.w13_*` / `w2_*` and silently skips any name without a parameter.
`loader_names` runs the first two steps as they are (the generator is driven with a stand-in for
AutoWeightsLoader); `unmapped_expert_keys` checks the third against vLLM's own expert mapping table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace
from unittest import mock

import torch

from nvfp4.layout import EXPERT_RE, Checkpoint, split_key

# vLLM's module tree: Gemma4DecoderLayer.moe (Gemma4MoE) .experts (FusedMoE) holds every expert's weights.
EXPERT_PARAM_RE = re.compile(r"^layers\.\d+\.moe\.experts\.")


def loader_names(ckpt: Checkpoint, keys: Iterable[str]) -> dict[str, list[str]]:
    """checkpoint key -> the names `Gemma4Model.load_weights` receives for it ([] when vLLM drops the key)."""
    from transformers import AutoConfig
    from vllm.model_executor.models import gemma4

    conditional = (ckpt.config.get("architectures") or [""])[0] == "Gemma4ForConditionalGeneration"
    if conditional:
        from vllm.model_executor.models.gemma4_mm import Gemma4ForConditionalGeneration

        mapper = Gemma4ForConditionalGeneration.hf_to_vllm_mapper
    names: dict[str, list[str]] = {}
    pending = []
    for key in keys:
        names[key] = []
        name = mapper._map_name(key) if conditional else key
        if conditional and (name is None or not name.startswith("language_model.")):
            continue  # dropped, or a tower's weight
        pending.append((key, name.removeprefix("language_model.") if conditional else name))

    source = {"key": None}

    def weights():
        for key, name in pending:
            source["key"] = key
            yield name, torch.empty(ckpt.tensors[key].shape, device="meta")

    class Recorder:  # stands in for AutoWeightsLoader: drains the generator, keeps what reaches `model.`
        def __init__(self, module, **kwargs):
            pass

        def load_weights(self, stream):
            for name, _ in stream:
                if name.startswith("model."):
                    names[source["key"]].append(name.removeprefix("model."))
            return set()

    text_config = AutoConfig.from_pretrained(ckpt.path).get_text_config()
    with mock.patch.object(gemma4, "AutoWeightsLoader", Recorder):
        gemma4.Gemma4ForCausalLM.load_weights(SimpleNamespace(config=text_config), weights())
    return names


def unmapped_expert_keys(ckpt: Checkpoint, rename=None) -> list[str]:
    """Per-expert keys that no FusedMoE parameter would receive (after `rename`, when given)."""
    from vllm.model_executor.layers.fused_moe.layer import fused_moe_make_expert_params_mapping

    keys = [k for k in ckpt.tensors if EXPERT_RE.match(split_key(k)[0])]
    if not keys:
        return []
    num_experts = ckpt.text_config.get("num_experts") or 0
    table = fused_moe_make_expert_params_mapping(torch.nn.Module(), "gate_proj", "down_proj", "up_proj", num_experts)
    renamed = {k: rename(k) if rename else k for k in keys}
    names = loader_names(_Renamed(ckpt, renamed), renamed.values())
    unmapped = []
    for key in keys:
        targets = [n.replace(w, p) for n in names[renamed[key]] for p, w, _, _ in table if w in n]
        if not targets or not all(EXPERT_PARAM_RE.match(t) for t in targets):
            unmapped.append(key)
    return unmapped


class _Renamed:
    """A checkpoint seen under new key names (headers only), to ask vLLM what it would do with them."""

    def __init__(self, ckpt: Checkpoint, renamed: dict[str, str]):
        self.path, self.config = ckpt.path, ckpt.config
        self.tensors = {new: ckpt.tensors[old] for old, new in renamed.items()}


def to_moe_experts(key: str) -> str:
    """`<layer>.experts.<E>.` -> `<layer>.moe.experts.<E>.`: the name vLLM's Gemma 4 module tree uses."""
    return re.sub(r"(?<!\.moe)\.experts\.(\d+)\.", r".moe.experts.\1.", key)
