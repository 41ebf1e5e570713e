"""Config validation: every bad value is one clear line naming the key; every shipped option passes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from helpers import run_main
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiontune.cli import CONF_DIR, run_cli
from visiontune.config import (
    TrainConfig,
    all_keys,
    validate_compress_config,
    validate_config,
    validate_eval_config,
)
from visiontune.errors import UserError
from visiontune.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
# Hydra's own settings, and sweeps (they set Hydra's sweeper, not config values): not part of the schema
NOT_GROUPS = {"hydra", "hparams_search", "adapt"}  # adapt: eval's and predict's group (tests/test_adapt.py)


def compose_train(overrides: list[str], config_name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, "paths.output_dir=/tmp/unused"])


# (overrides, key the message must name, text of the bad value it must show)
BAD = [
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["data.batch_size=-4"], "data.batch_size", "-4"),
    (["data.batch_size=2.5"], "data.batch_size", "2.5"),
    (["data.batch_size=abc"], "data.batch_size", "abc"),
    (["data.batch_size=true"], "data.batch_size", "True"),
    (["data.num_workers=-1"], "data.num_workers", "-1"),
    (["data.image_size=0"], "data.image_size", "0"),
    (["data.image_size=31.5"], "data.image_size", "31.5"),
    (["data.val_fraction=1.0"], "data.val_fraction", "1.0"),
    (["data.val_fraction=-0.1"], "data.val_fraction", "-0.1"),
    (["data.train_subset=0"], "data.train_subset", "0"),
    (["data.val_subset=0"], "data.val_subset", "0"),
    (["data.test_subset=-5"], "data.test_subset", "-5"),
    (["data.balance=oversample"], "data.balance", "oversample"),
    (["data=csv"], "data.root", "required"),
    (["++data.folds=1"], "data.folds", "1"),
    (["++data.folds=5", "++data.fold=5"], "data.fold", "5"),
    (["++data.folds=5", "++data.fold=-1"], "data.fold", "-1"),
    (["optimizer.lr=0"], "optimizer.lr", "0"),
    (["optimizer.lr=-1e-3"], "optimizer.lr", "-0.001"),
    (["optimizer.lr=abc"], "optimizer.lr", "'abc'"),
    (["optimizer.lr=nan"], "optimizer.lr", "nan"),
    (["~optimizer.lr"], "optimizer.lr", "missing"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1"),
    (["optimizer.name=rmsprop"], "optimizer.name", "rmsprop"),
    (["scheduler.name=linear"], "scheduler.name", "linear"),
    (["finetune.name=unfreeze_all"], "finetune.name", "unfreeze_all"),
    (["finetune=freeze_groups", "finetune.groups=a:b"], "finetune.groups", "a:b"),
    (["finetune=freeze_groups", "finetune.groups='1:2:3:4'"], "finetune.groups", "1:2:3:4"),
    (["finetune=freeze_groups", "finetune.groups='1:2:3'"], "finetune.groups", "1:2:3"),
    (["finetune=freeze_groups", "finetune.groups=x"], "finetune.groups", "x"),
    (["finetune=freeze_groups", "finetune.groups=[0,x]"], "finetune.groups", "[0, 'x']"),
    (["finetune=freeze_groups", "finetune.pattern='blocks.(1'"], "finetune.pattern", "blocks.(1"),
    (["model.head.dropout=1.0"], "model.head.dropout", "1.0"),
    (["model.head.dropout=-0.1"], "model.head.dropout", "-0.1"),
    (["model.label_smoothing=1.5"], "model.label_smoothing", "1.5"),
    (["trainer.precision=bf17"], "trainer.precision", "bf17"),
    (["trainer.precision=8"], "trainer.precision", "8"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "0"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs", "-1"),
    (["trainer.max_epochs=null"], "trainer.max_epochs", "None"),
    (["trainer.max_epochs=two"], "trainer.max_epochs", "two"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    # types that no rule covered before the schema; OmegaConf alone would turn 2, 7 and yes into true
    (["model.pretrained=maybe"], "model.pretrained", "maybe"),
    (["model.compile=1"], "model.compile", "1"),
    (["seed=abc"], "seed", "abc"),
    (["seed=-1"], "seed", "-1"),
    (["data.strict=2"], "data.strict", "2"),
    (["data.strict=yes"], "data.strict", "yes"),
    (["finetune.train_bn=7"], "finetune.train_bn", "7"),
    (["test=no"], "test", "no"),
    (["max_cpu_hours=0"], "max_cpu_hours", "0"),
    (["data.name=svhn"], "data.name", "svhn"),
    (["augment=flip", "augment.hflip=2"], "augment.hflip", "2"),
    (["augment=affine", "augment.translate=[a,b]"], "augment.translate", "['a', 'b']"),
    (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas", "[0.9]"),
    (["tune.lr_find=1"], "tune.lr_find", "1"),
    (["callbacks.checkpoint.mode=up"], "callbacks.checkpoint.mode", "up"),
    (["logger.csv=on"], "logger.csv", "on"),
    (["model.head=none"], "model.head", "none"),
]


@pytest.mark.parametrize(("overrides", "key", "value"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_key_and_value(overrides, key, value):
    cfg = compose_train(overrides)
    with pytest.raises(UserError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert key in message and value in message
    assert "must be" in message or "required" in message or "missing" in message


UNKNOWN = [
    (["+data.foo=1"], "data.foo", "not a key of the schema"),
    (["+model.head.width=3"], "model.head.width", "not a key of the schema"),
    (["+seeds=1"], "seeds", "not a key of the schema"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch", "not a lightning.Trainer argument"),
    (["+trainer.callbacks=[]"], "trainer.callbacks", "the run sets it itself"),
]


@pytest.mark.parametrize(("overrides", "key", "why"), UNKNOWN, ids=[" ".join(o) for o, _, _ in UNKNOWN])
def test_a_key_the_schema_does_not_declare_is_refused(overrides, key, why):
    with pytest.raises(UserError, match=f"unknown config key {key}: {why}"):
        validate_config(compose_train(overrides))


def leaf_keys(node, prefix=""):
    for key in node:
        value = node[key]
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield path
            yield from leaf_keys(value, f"{path}.")
        else:
            yield path


def test_every_key_has_a_type_and_a_one_line_doc():
    """Every key the schema declares has a doc of one short line (test_every_shipped_option_passes_validation
    checks that the schema declares every key an option sets)."""
    declared = {k.path: k for k in all_keys(TrainConfig)}
    for k in declared.values():
        assert k.doc and "\n" not in k.doc and len(k.doc) <= 100, k.path
    assert {"model.pretrained", "model.compile", "data.strict", "finetune.train_bn", "seed"} <= set(declared)


def undeclared_keys(cfg) -> list[str]:
    """The keys of a composed config that the schema does not declare (passthrough mappings such as
    logger.mlflow and any extra lightning.Trainer argument hold what their library takes)."""
    from omegaconf import OmegaConf

    declared = {k.path: k for k in all_keys(TrainConfig)}
    passthrough = {p for p, k in declared.items() if "dict" in str(k.type)}
    return [
        path
        for path in leaf_keys(OmegaConf.to_container(cfg))
        if not path.startswith("trainer.")
        and not any(path.startswith(p + ".") for p in passthrough)
        and path not in declared
    ]


@pytest.mark.parametrize(
    "override", ["model.pretrained=maybe", "seed=abc", "data.strict=2", "finetune.train_bn=7"]
)
def test_the_train_entry_ends_a_wrong_type_with_one_line_and_exit_2(override, capsys):
    """In process, through the entry's own run_cli: the message on one line of stderr, exit code 2."""
    from visiontune.train import train

    with pytest.raises(SystemExit) as info:
        run_cli(train, compose_train(["experiment=fashion_mnist_lite0", override]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: invalid config value {override.split('=')[0]}=")


HYDRA_ERRORS = [
    ("data.foo=1", "Could not override 'data.foo'. To append to your config use +data.foo=1"),
    ("data=foo", "Available options in 'data': cifar10, cifar100, csv, fashion_mnist, imagefolder, mnist"),
    ("optimizer.lr=[1", "no viable alternative at input '[1'"),
]


@pytest.mark.parametrize(("argument", "says"), HYDRA_ERRORS, ids=[a for a, _ in HYDRA_ERRORS])
def test_hydra_own_errors_are_one_line_and_exit_2(argument, says, monkeypatch, capsys, tmp_path):
    """Hydra finds these before any task runs; they end like all bad input (the private bases unlisted)."""
    from visiontune.train import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["visiontune-train", argument, f"hydra.run.dir={tmp_path}"])
    try:
        with pytest.raises(SystemExit) as info:
            main()
    finally:
        GlobalHydra.instance().clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and says in lines[0] and "_base" not in lines[0]


def help_text(overrides: list[str]) -> str:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/x"], return_hydra_config=True)
    return cfg.hydra.help.template


def test_help_lists_the_groups_without_the_private_bases_and_the_keys_with_their_docs():
    text = help_text([])
    assert "_base" not in text and "_standard" not in text
    assert (
        "  finetune: bitfit, freeze_groups, freeze_unfreeze, full*, gradual, linear_probe, lora, norm" in text
    )
    assert "  optimizer: adam, adamw*, sgd" in text
    assert "  model.pretrained (bool) = true: load the backbone's pretrained weights" in text
    assert "  seed (int) = 42: " in text and "  data.strict (bool) = false: " in text
    assert "augment.jsd" not in text  # a key of another augment option
    chosen = help_text(["augment=augmix", "seed=7"])
    assert (
        "augmix*" in chosen and "  augment.jsd (bool) = false: " in chosen and "  seed (int) = 7: " in chosen
    )


def test_the_message_says_what_is_allowed():
    cases = {
        "optimizer.name=rmsprop": "one of sgd, adam, adamw",
        "data.balance=x": "one of none, sampler, loss_weights",
        "data.val_fraction=1": "in [0, 1)",
        "trainer.precision=bf17": "bf16-mixed",
        "finetune.name=x": "freeze_groups",
    }
    for override, allowed in cases.items():
        with pytest.raises(UserError) as info:
            validate_config(compose_train([override]))
        assert allowed in str(info.value)
    with pytest.raises(UserError, match=r"data.fold=4: must be an integer in \[0, 4\)"):
        validate_config(compose_train(["++data.folds=4", "++data.fold=4"]))


GOOD = [
    [],
    ["data.image_size=null", "data.num_workers=0", "data.val_fraction=0"],
    ["++data.folds=5", "++data.fold=4"],
    ["++data.folds=null", "++data.fold=null"],
    ["trainer.max_epochs=null", "+trainer.max_steps=100"],
    ["trainer.precision=bf16-mixed"],
    ["trainer.precision='16'"],
    ["trainer.precision=64"],
    ["trainer.devices=auto"],
    ["trainer.devices=-1"],
    ["trainer.devices=[0,1]"],
    ["finetune=freeze_groups", "finetune.groups=2"],
    ["finetune=freeze_groups", "finetune.groups=[0,1,-1]"],
    ["finetune=freeze_groups", "finetune.groups=':-1'"],
    ["finetune=freeze_groups", "finetune.groups=2:-1"],
    ["finetune=freeze_groups", "finetune.groups=null", "finetune.pattern='blocks\\.[0-3]'"],
    ["optimizer=sgd", "optimizer.lr=1", "scheduler=onecycle"],
    ["model.head.dropout=0.0", "model.label_smoothing=0.1"],
    ["+trainer.val_check_interval=0.5", "+trainer.limit_train_batches=0.25"],
    ["callbacks.early_stopping={monitor: val/acc, mode: max, patience: 3}", "logger=mlflow"],
    ["seed=0", "max_cpu_hours=null", "data.strict=true", "finetune.train_bn=true", "model.pretrained=false"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) or "default" for o in GOOD])
def test_good_values_pass(overrides):
    assert validate_config(compose_train(overrides)) == []


def group_options() -> list[tuple[str, str]]:
    groups = sorted(d.name for d in CONF.iterdir() if d.is_dir() and d.name not in NOT_GROUPS)
    return [
        (g, p.stem) for g in groups for p in sorted((CONF / g).glob("*.yaml")) if not p.stem.startswith("_")
    ]


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_shipped_option_passes_validation(group, option):
    needs_root = (
        ["data.root=/some/where"]
        if (group, option) in (("data", "csv"), ("data", "imagefolder"), ("data", "shards"))
        else []
    )
    if (group, option) == ("task", "multitask"):  # its heads name the columns of your CSV
        needs_root = ["task.heads=[{name: a, column: a, kind: multiclass, weight: 1.0}]"]
    cfg = compose_train([f"{group}={option}", *needs_root])
    assert undeclared_keys(cfg) == [], f"{group}={option}: keys with no type and doc in the schema"
    validate_config(cfg)  # warnings are fine; errors are not


def test_a_warmup_longer_than_the_run_is_a_warning_not_an_error(caplog):
    with caplog.at_level(logging.WARNING, logger="visiontune"):
        found = validate_config(compose_train(["scheduler.warmup_epochs=3", "trainer.max_epochs=3"]))
    assert len(found) == 1 and "scheduler.warmup_epochs=3" in found[0] and "trainer.max_epochs=3" in found[0]
    assert "warmup_epochs" in caplog.text
    assert validate_config(compose_train(["scheduler.warmup_epochs=2", "trainer.max_epochs=3"])) == []


def test_eval_config_checks_the_data_keys_it_is_given():
    assert validate_eval_config(compose_train(["ckpt_path=x"], config_name="eval")) == []
    with pytest.raises(UserError, match="data.batch_size=0"):
        validate_eval_config(compose_train(["ckpt_path=x", "data.batch_size=0"], config_name="eval"))


def test_compress_config_checks_its_fine_tune_trainer():
    given = ["ckpt_path=x", "method=prune"]
    assert validate_compress_config(compose_train(given, config_name="compress")) == []
    with pytest.raises(UserError, match="trainer.precision"):
        validate_compress_config(compose_train([*given, "trainer.precision=9"], config_name="compress"))


# The command's entry, in process (the catalogue, test_catalogue.py, starts each command for real once):
# exit code 2, one line on stderr, no traceback (needs train() to call validate_config).
CLI_CASES = [
    ("data.batch_size=0", "data.batch_size"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("trainer.precision=bf17", "trainer.precision"),
    ("finetune=freeze_groups finetune.groups=a:b", "finetune.groups"),
]


@pytest.mark.parametrize(("overrides", "key"), CLI_CASES)
def test_the_train_command_exits_2_with_one_line(overrides, key, tmp_path, capsys):
    code = run_main(train_main, *overrides.split(), f"hydra.run.dir={tmp_path}")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err[-2000:]
    assert "Traceback" not in err + out


def test_the_help_command_lists_no_private_base(capsys):
    assert run_main(train_main, "--help") == 0
    out = capsys.readouterr().out
    assert "== Config groups" in out and "  data.root (str) = ${paths.data_dir}: " in out
    assert "_base" not in out and "_standard" not in out
