"""Config validation: every bad value is one clear line naming the key; every shipped option passes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from visiontune.cli import CONF_DIR
from visiontune.config import validate_config, validate_eval_config
from visiontune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(CONF_DIR)
# Hydra's own settings, and sweeps (they set Hydra's sweeper, not config values): not part of the schema
NOT_GROUPS = {"hydra", "hparams_search"}


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
        ["data.root=/some/where"] if (group, option) in (("data", "csv"), ("data", "imagefolder")) else []
    )
    if (group, option) == ("task", "multitask"):  # its heads name the columns of your CSV
        needs_root = ["task.heads=[{name: a, column: a, kind: multiclass, weight: 1.0}]"]
    cfg = compose_train([f"{group}={option}", *needs_root])
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
    with pytest.raises(UserError, match="trainer.precision"):
        validate_eval_config(compose_train(["ckpt_path=x", "++trainer.precision=9"], config_name="eval"))


# The real command: exit code 2, one line on stderr, no traceback (needs train() to call validate_config).
CLI_CASES = [
    ("data.batch_size=0", "data.batch_size"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("trainer.precision=bf17", "trainer.precision"),
    ("finetune=freeze_groups finetune.groups=a:b", "finetune.groups"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "key"), CLI_CASES)
def test_the_train_command_exits_2_with_one_line(overrides, key, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "visiontune.train", *overrides.split(), f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
