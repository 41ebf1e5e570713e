"""The layer shapes of a pruned model, as plain values, so a pruned checkpoint loads with weights_only=True.

Structured pruning (compress method=prune) removes whole channels: the model keeps its modules and
parameter names, but its convolutions, norms and linears get narrower. A checkpoint of it stores
`structure` (module name -> its shape attributes, plain ints and lists) next to its state_dict, and
`apply_structure` narrows a freshly built model to those shapes before the weights are loaded. No
module is pickled, and loading needs no pruning library.
"""

from __future__ import annotations

import torch
from torch import nn

from visiontune.errors import UserError

# The attributes that say how wide a layer is (forward reads some, e.g. `groups`; repr reads the rest).
SHAPE_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "groups",
    "num_features",
    "in_features",
    "out_features",
    "num_channels",
    "num_groups",
    "normalized_shape",
)


def _shape_value(value):
    """An int, or a tuple/list of ints as a list; None for anything else (e.g. a Backbone's `groups`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, tuple | list) and value and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def describe_structure(model: nn.Module) -> dict[str, dict]:
    """Module name -> {shape attribute: value} for every module that has one."""
    structure = {}
    for name, module in model.named_modules():
        attributes = {}
        for attribute in SHAPE_ATTRIBUTES:
            value = _shape_value(getattr(module, attribute, None))
            if value is not None:
                attributes[attribute] = value
        if attributes:
            structure[name] = attributes
    return structure


def apply_structure(model: nn.Module, structure: dict, state_dict: dict) -> nn.Module:
    """Narrow `model` (as built from its hyperparameters) to a pruned checkpoint's shapes, in place.

    Sets the recorded attributes, then replaces every parameter and buffer whose shape differs from
    the checkpoint's with an uninitialised one of that shape: `load_state_dict` fills them next.
    """
    modules = dict(model.named_modules())
    for name, attributes in structure.items():
        if name not in modules:
            raise UserError(f"the pruned checkpoint names a layer '{name}' that its model does not have")
        for attribute, value in attributes.items():
            setattr(modules[name], attribute, tuple(value) if isinstance(value, list) else value)
    for key, saved in state_dict.items():
        owner_name, _, attribute = key.rpartition(".")
        owner = modules.get(owner_name)
        current = getattr(owner, attribute, None) if owner is not None else None
        if not isinstance(current, torch.Tensor) or current.shape == saved.shape:
            continue  # load_state_dict reports anything still missing or unexpected
        empty = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(owner, attribute, nn.Parameter(empty, requires_grad=current.requires_grad))
        else:
            setattr(owner, attribute, empty)
    return model
