"""LoRA adapters in a backbone (Hugging Face `peft`), and the small artefact of a parameter-efficient run.

`add_lora` wraps the chosen Linear and Conv2d layers of a `Backbone` in peft's LoRA layers (the base
weight stays where it was, under `<layer>.base_layer`, and `lora_A`/`lora_B` are new) and regroups the
backbone's parameters, so that every strategy, per-group LR and checkpoint sees the adapted model as
one more backbone: the LoRA tensors of a layer join that layer's group. A model built from a
checkpoint's hyperparameters adds the same adapters, so its state_dict keys match.

`merge_lora` folds each update into its base weight and puts the plain layer back (export does that:
the exported graph has no LoRA in it). `adapter_keys` names what a parameter-efficient run trained:
training/checkpoints.py writes those tensors as `adapter.safetensors` and rebuilds a model from them.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from visiontune.errors import UserError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
LORA_MARK = ".lora_"  # every LoRA tensor's name holds it: lora_A, lora_B, lora_magnitude_vector
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def auto_targets(backbone) -> list[str]:
    """The default LoRA layers: every Linear (a ViT's attention qkv/proj and its MLP) and every pointwise
    1x1 convolution (a ConvNet's channel mixing), plus the full convolutions of the top group."""
    top = set(backbone.groups[-1].param_names)
    names = []
    for name, module in backbone.body.named_modules():
        full_conv = isinstance(module, nn.Conv2d) and module.groups == 1 and f"body.{name}.weight" in top
        if isinstance(module, nn.Linear) or is_pointwise(module) or full_conv:
            names.append(name)
    return names


def _layer_group(backbone) -> dict[str, int]:
    """Module name (relative to the body) -> the group of its weight."""
    owner = {p: i for i, g in enumerate(backbone.groups) for p in g.param_names}
    return {
        name: owner[f"body.{name}.weight"]
        for name, _ in backbone.body.named_modules()
        if f"body.{name}.weight" in owner
    }


def select_targets(backbone, target, skip_groups: set[int], group_of: dict[str, int]) -> list[str]:
    """Names (relative to the body) of the Linear/Conv2d layers that get LoRA: `target` is auto or a list
    of regexes matched against the whole module name; layers in `skip_groups` (by `group_of`, from
    `_layer_group`) are left out."""
    layers = {
        name: m for name, m in backbone.body.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and name
    }
    if target in (None, "auto"):
        chosen = auto_targets(backbone)
    else:
        patterns = [target] if isinstance(target, str) else list(target)
        chosen = []
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"finetune.lora.target: {pattern!r} is not a valid regex ({exc})") from None
            matched = [name for name in layers if regex.fullmatch(name)]
            if not matched:
                examples = ", ".join(list(layers)[:: max(1, len(layers) // 6)][:6])
                raise UserError(
                    f"finetune.lora.target: {pattern!r} matches no Linear or Conv2d layer of "
                    f"{backbone.name} (some that exist: {examples}); or use target=auto"
                )
            chosen += [name for name in matched if name not in chosen]
    chosen = [name for name in chosen if group_of.get(name) not in skip_groups]
    if not chosen:
        raise UserError(
            f"finetune=lora: no layer of {backbone.name} is left to adapt (target={target}, frozen groups "
            f"{sorted(skip_groups)}); adapt more groups or use finetune=linear_probe"
        )
    return chosen


def add_lora(backbone, r: int, alpha: float, dropout: float, target, skip_groups: set[int]) -> list[str]:
    """Wrap the target layers of `backbone` in LoRA layers (rank r, scaling alpha / r), in place; regroup
    its parameters. Returns the adapted layer names."""
    if int(r) <= 0:
        raise UserError(f"finetune.lora.r={r}: the rank must be at least 1 (4, 8 or 16 are usual)")
    from peft import LoraConfig, inject_adapter_in_model

    group_of = _layer_group(backbone)
    chosen = select_targets(backbone, target, skip_groups, group_of)
    before = {name: i for i, g in enumerate(backbone.groups) for name in g.param_names}
    # an exact-name regex, so that a layer whose name ends like another's is not adapted too
    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules="|".join(re.escape(name) for name in chosen),
        bias="none",
    )
    inject_adapter_in_model(config, backbone.body)
    names = [[] for _ in backbone.groups]
    for name, _ in backbone.named_parameters():
        if LORA_MARK in name:
            layer = name.removeprefix("body.").split(LORA_MARK)[0]
            names[group_of[layer]].append(name)
        else:
            names[before[name.replace(".base_layer.", ".")]].append(name)
    for group, param_names in zip(backbone.groups, names, strict=True):
        group.param_names = param_names
    return chosen


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain layer back, in place; how many."""
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    for name, layer in layers:
        layer.merge()
        parent_name, _, attribute = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attribute, layer.get_base_layer())
    return len(layers)


# ---------------------------------------------------------------- the adapter file


def adapter_keys(model) -> list[str]:
    """The state_dict keys a parameter-efficient run trained: the backbone tensors its strategy trains
    (and the running statistics of the norm layers it trains in training mode), and the whole head."""
    schedule = model.freeze_schedule
    keys = [f"backbone.{n}" for n, _ in model.backbone.named_parameters() if schedule.trains(n)]
    if schedule.update_norm_stats:
        for name, module in model.backbone.named_modules():
            if isinstance(module, NORM_TYPES):
                keys += [f"backbone.{name}.{b}" for b, _ in module.named_buffers(recurse=False)]
    keys += [f"head.{k}" for k in model.head.state_dict()]
    return keys


def share_base(models: list[nn.Module]) -> int:
    """Make every model use the first one's copy of each tensor it did not train, in place: N adapters
    of one backbone then hold one backbone in memory. A LoRA layer's base weight is matched to the plain
    layer's (`x.base_layer.weight` is `x.weight`). Returns how many tensors now point at another's."""
    if not models:
        return 0

    def plain(name: str) -> str:
        return name.replace(".base_layer.", ".")

    first = {plain(n): t for n, t in [*models[0].named_parameters(), *models[0].named_buffers()]}
    shared = 0
    for model in models[1:]:
        own = set(adapter_keys(model))
        modules = dict(model.named_modules())
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            other = first.get(plain(name))
            if name in own or other is None or other.shape != tensor.shape or other.dtype != tensor.dtype:
                continue
            owner, _, attribute = name.rpartition(".")
            module = modules[owner]
            if isinstance(tensor, nn.Parameter):
                if not isinstance(other, nn.Parameter) or not torch.equal(other, tensor):
                    continue
                setattr(module, attribute, other)
            elif attribute in module._buffers and torch.equal(other, tensor):
                module._buffers[attribute] = other
            else:
                continue
            shared += 1
    return shared
