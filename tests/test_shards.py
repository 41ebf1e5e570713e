"""Shards (visiontune-shard, data=shards) and the data order on every rank.

Fast: the round trip (every stored image equals its decoded file at the pre-crop size, every label its
source's; a multitask CSV and an in-memory set too), a stopped writer (no manifest, then a resume that
keeps the finished split), the sampler's parts (disjoint, whole, equal batches, skip = the rest), the
per-sample augmentation seed, a remote root read through a bounded cache, a bad shard set refused.
Slow: 2 nodes on loopback (torchrun, `trainer=multinode`) and 2-rank DDP on CPU (`trainer=ddp_cpu`): each rank reads a
disjoint part and their union is the split, in each epoch; a run resumed from the middle of an epoch
ends with the uninterrupted run's weights, for shards and for an image folder, with random flips.
The bad-input lines are rows of tests/test_catalogue.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODEL, ROOT, compose_cfg, run
from PIL import Image

from visiontune import preview
from visiontune.build import build_datamodule
from visiontune.data import shards
from visiontune.data.cache import precrop_geometry
from visiontune.data.datamodule import EpochShuffleSampler, SeededSamples, sample_seed
from visiontune.data.files import load_image
from visiontune.data.shards import open_shards
from visiontune.errors import UserError


def means_folder(root: Path, train: int = 27, held: int = 4) -> Path:
    """Two classes of 16 px images, each of its own mean (left half a, right half a + 30): a horizontal flip
    keeps the mean, so tests/record_run.py's means name the images read."""
    k = 0
    for split, n in (("train", train), ("val", held), ("test", held)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.zeros((16, 16, 3), np.uint8)
                pixels[:, :8], pixels[:, 8:] = 20 + 2 * k, 50 + 2 * k
                Image.fromarray(pixels).save(folder / f"{i}.png")
                k += 1
    return root


def noise_folder(root: Path, per_class: int = 12) -> Path:
    """A flat folder of three classes of noise images of several sizes (so each is resized on the way)."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(20, 40, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def write(tmp: Path, out: Path, *overrides: str) -> dict:
    """visiontune-shard's task in this process; its summary."""
    cfg = compose_cfg(
        [f"out={out}", "num_workers=0", "chunk_bytes=8kB", *overrides], tmp / "shard_run", "shard"
    )
    return preview.shard(cfg)


def shard_datamodule(tmp: Path, root, *overrides: str):
    cfg = compose_cfg(["data=shards", f"data.root={root}", *MODEL, *overrides], tmp / "run")
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return datamodule


def test_every_stored_image_is_its_decoded_file_at_the_precrop_size_and_labels_match(tmp_path, capsys):
    source = noise_folder(tmp_path / "flat")
    settings = ["data=imagefolder", f"data.root={source}", "data.image_size=16", "data.crop_pct=0.875"]
    summary = write(tmp_path, tmp_path / "shards", *settings)
    assert "shards: 36 images" in capsys.readouterr().out
    assert summary["images"] == 36 and summary["shards"] >= 3

    original = build_datamodule(compose_cfg([*settings, *MODEL], tmp_path / "run"))
    original.setup("fit")
    stored = shard_datamodule(tmp_path, tmp_path / "shards")
    assert stored.classes == ["cat", "dog", "owl"] and stored.image_size == 16 and stored.crop_pct == 0.875
    geometry = precrop_geometry(16, 0.875, original.interpolation)
    for index, split in enumerate(("train", "val", "test")):
        source_set, shard_set = getattr(original, f"{split}_set"), getattr(stored, f"{split}_set")
        order = np.random.default_rng([42, index]).permutation(len(source_set))  # the write order
        assert len(shard_set) == len(source_set)
        for k, i in enumerate(order):
            expected = geometry(load_image(source_set.paths[i])).as_subclass(torch.Tensor)
            assert torch.equal(shard_set.raw(k), expected), (split, k)
            assert shard_set.target(k) == source_set.target(i) == shard_set[k][1]
        assert shard_set[0][0].shape == (3, 16, 16)  # through the run's transforms


def test_a_multitask_csv_and_an_in_memory_set_keep_their_targets(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    lines = ["path,shape,tags"]
    for i in range(24):
        Image.new("RGB", (12, 12), (i * 10, 0, 0)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{('round', 'square')[i % 2]},{('', 'red', 'red|big')[i % 3]}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    heads = "task.heads=[{name: shape, kind: multiclass}, {name: tags, kind: multilabel}]"
    settings = [
        "data=csv",
        f"data.root={folder / 'train.csv'}",
        "data.image_size=12",
        "task=multitask",
        heads,
    ]
    write(tmp_path, tmp_path / "task_shards", *settings)
    original = build_datamodule(compose_cfg([*settings, *MODEL], tmp_path / "run"))
    original.setup("fit")
    stored = shard_datamodule(tmp_path, tmp_path / "task_shards", "task=multitask")
    assert [h["classes"] for h in stored.heads] == [["round", "square"], ["big", "red"]]
    order = np.random.default_rng([42, 0]).permutation(len(original.train_set))
    for k, i in enumerate(order):
        got, want = stored.train_set.target(k), original.train_set.target(i)
        assert got.keys() == want.keys() and all(torch.equal(got[h], want[h].to(got[h].dtype)) for h in got)

    write(tmp_path, tmp_path / "fmnist", "data.train_subset=40", "data.val_subset=10", "data.test_subset=10",
          "data.image_size=28", "data.crop_pct=1.0")  # fmt: skip
    memory = build_datamodule(compose_cfg(["data.train_subset=40", "data.val_subset=10", "data.test_subset=10",
                                           "data.image_size=28", *MODEL], tmp_path / "run"))  # fmt: skip
    memory.setup("fit")
    stored = shard_datamodule(tmp_path, tmp_path / "fmnist")
    order = np.random.default_rng([42, 2]).permutation(10)
    for k, i in enumerate(order):
        assert torch.equal(stored.test_set.raw(k), memory.test_set.images[i].expand(3, -1, -1))
        assert stored.test_set.target(k) == memory.test_set.target(i)
    assert stored.classes[0] == "T-shirt/top"


def test_a_stopped_writer_leaves_no_complete_set_and_a_rerun_resumes(tmp_path, monkeypatch, caplog):
    source = means_folder(tmp_path / "folder")
    settings = ["data=imagefolder", f"data.root={source}", "data.image_size=16", "data.crop_pct=1.0"]
    out = tmp_path / "shards"
    replace = os.replace

    def stop_at_val(src, dst):
        if Path(dst).name == "val":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", stop_at_val)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, out, *settings)
    monkeypatch.setattr(shards.os, "replace", replace)
    assert not (out / "manifest.json").exists() and (out / "train" / "index.json").is_file()
    with pytest.raises(UserError, match="holds no manifest.json: an unfinished shard set"):
        open_shards(out)
    train_chunks = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.bin")}

    with caplog.at_level("INFO", logger="visiontune"):
        write(tmp_path, out, *settings)
    assert "resuming an unfinished shard set: train already written" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.bin")} == train_chunks  # kept
    assert open_shards(out).manifest["splits"]["val"]["images"] == 8
    assert not (out / "progress.json").exists()

    caplog.clear()
    with caplog.at_level("INFO", logger="visiontune"):
        assert write(tmp_path, out, *settings)["skipped"]
    with pytest.raises(UserError, match="already holds a shard set of another source"):
        write(tmp_path, out, *settings[:-1], "data.crop_pct=0.5")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not empty and holds no shard set"):
        write(tmp_path, tmp_path / "mine", *settings, "overwrite=true")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("n", "replicas", "batch", "groups"),
                         [(54, 2, 8, None), (50, 3, 4, [8, 8, 8, 8, 8, 8, 2]), (129, 2, 64, None), (7, 2, 2, [3, 4])])  # fmt: skip
def test_the_ranks_read_disjoint_parts_that_make_the_whole_epoch_in_equal_batches(n, replicas, batch, groups):
    for epoch in (0, 1):
        parts = []
        for rank in range(replicas):
            sampler = EpochShuffleSampler(
                n, 3, groups=groups, num_replicas=replicas, rank=rank, batch_size=batch
            )
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
            assert len(parts[-1]) == len(sampler)
        everything = [i for part in parts for i in part]
        assert sorted(set(everything)) == list(range(n))  # the whole epoch
        assert len(everything) - n <= replicas - 1  # a short rank repeats at most one image
        assert len({-(-len(p) // batch) for p in parts}) == 1  # the same number of batches on every rank
        if len(everything) == n:
            assert len(set(everything)) == n  # disjoint
    assert list(EpochShuffleSampler(n, 3, groups=groups)) != list(EpochShuffleSampler(n, 4, groups=groups))


def test_chunks_are_read_one_after_another_and_a_skip_continues_the_same_order():
    groups = [10, 10, 10, 10, 5]
    starts = np.cumsum([0, *groups])
    sampler = EpochShuffleSampler(45, 0, groups=groups, num_replicas=1, rank=0, batch_size=4)
    sampler.set_epoch(2)
    order = list(sampler)
    chunk_of = [int(np.searchsorted(starts, i, side="right")) - 1 for i in order]
    switches = sum(a != b for a, b in zip(chunk_of, chunk_of[1:], strict=False))
    assert switches == len(groups) - 1  # each chunk read in one go
    assert order != sorted(order)
    sampler.skip = 12
    assert list(sampler) == order[12:]
    assert list(sampler) == order  # the skip is for one pass


def test_each_loader_worker_is_dealt_chunks_of_its_own():
    groups = [16] * 8
    sampler = EpochShuffleSampler(128, 1, groups=groups, num_replicas=1, rank=0, batch_size=4, workers=2)
    order = list(sampler)
    assert sorted(order) == list(range(128))
    batches = [order[i : i + 4] for i in range(0, 128, 4)]
    chunks = [{i // 16 for i in batch} for batch in batches]
    by_worker = [set().union(*chunks[w::2]) for w in range(2)]  # the DataLoader hands batch i to worker i % 2
    assert not by_worker[0] & by_worker[1] and len(by_worker[0]) == len(by_worker[1]) == 4
    sampler.skip = 10
    assert list(sampler) == order[10:]


def test_an_images_augmentation_depends_on_seed_epoch_and_index_alone():
    from torchvision.transforms import v2

    images = torch.arange(8 * 3 * 4 * 4, dtype=torch.uint8).reshape(8, 3, 4, 4)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return v2.RandomHorizontalFlip()(images[i]), torch.rand(()).item()

    seeded = SeededSamples(Images())
    key = (5, sample_seed(0, 1, 5))
    torch.manual_seed(123)
    first = seeded[key]
    state = torch.get_rng_state()
    torch.rand(17)  # another RNG state
    second = seeded[key]
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    torch.manual_seed(123)
    seeded[key]
    assert torch.equal(torch.get_rng_state(), state)  # the process's RNG is left as it was
    draws = {seeded[(5, sample_seed(0, epoch, 5))][1] for epoch in range(6)}
    assert len(draws) == 6  # another epoch, another draw
    assert sample_seed(0, 1, 5) != sample_seed(0, 1, 6) != sample_seed(1, 1, 6)


def test_a_remote_root_is_read_through_a_cache_that_stays_within_its_limit(tmp_path):
    source = noise_folder(tmp_path / "flat", per_class=40)
    write(tmp_path, tmp_path / "shards", "data=imagefolder", f"data.root={source}", "data.image_size=16",
          "data.crop_pct=1.0", "chunk_bytes=4kB")  # fmt: skip
    local = shard_datamodule(tmp_path, tmp_path / "shards", "data.num_workers=0")
    chunk = max(c[1] for c in local.shards.manifest["splits"]["train"]["chunks"])
    limit = 3 * 2 * chunk + chunk // 2  # 3 splits x 2 chunks: the least it takes, one reader per split
    remote = shard_datamodule(tmp_path, f"local:{tmp_path / 'shards'}", "data.num_workers=0",
                              f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit={limit}")  # fmt: skip
    assert remote.classes == local.classes
    sampler = EpochShuffleSampler(len(remote.train_set), 0, groups=remote.train_set.groups)
    folder = None
    for i in sampler:
        assert torch.equal(remote.train_set.raw(i), local.train_set.raw(i))
        folder = remote.train_set._folder
        held = sum(p.stat().st_size for p in folder.glob("*.bin"))
        assert held <= remote.train_set.share, held
    assert len(list(folder.glob("*.bin"))) < len(remote.train_set.groups)  # some were dropped
    with pytest.raises(UserError, match="too small for local:"):
        shard_datamodule(tmp_path, f"local:{tmp_path / 'shards'}", "data.num_workers=2",
                         f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit={limit}")  # fmt: skip


# ------------------------------------------------------------------ several processes (slow)
# every rank of every launcher computes alike (a reduction over 2 threads may round otherwise)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def record_run(run_dir: Path, record: Path, *args: str, mid: str = ""):
    env = {**os.environ, "RECORD_DIR": str(record), "MID_AT": mid, **ONE_THREAD}
    return run("tests/record_run.py", *args, f"hydra.run.dir={run_dir}", env=env)


def ddp_args(data: list[str]) -> list[str]:
    return [*data, "data.batch_size=8", *MODEL, "trainer.max_epochs=2", "trainer.num_sanity_val_steps=0",
            "augment=flip", "callbacks.curves=false", "callbacks.progress.refresh_rate=0", "logger=csv"]  # fmt: skip


def seen(record: Path, ranks: int) -> list[dict]:
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(ranks)]


def assert_disjoint_and_whole(parts: list[dict], images: int, epochs: int) -> None:
    for epoch in range(epochs):
        reads = [p[str(epoch)] for p in parts]
        every = [m for r in reads for m in r]
        assert len(every) == len(set(every)) == images, (epoch, [len(r) for r in reads])


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    source = means_folder(folder / "folder")
    write(folder, folder / "shards", "data=imagefolder", f"data.root={source}", "data.image_size=16",
          "data.crop_pct=1.0", "chunk_bytes=4kB")  # fmt: skip
    return {
        "shards": ["data=shards", f"data.root={folder / 'shards'}", "data.num_workers=0"],
        "folder": [
            "data=imagefolder",
            f"data.root={source}",
            "data.image_size=16",
            "data.crop_pct=1.0",
            "data.num_workers=1",
        ],  # fmt: skip
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(run_dir: Path, record: Path, *args: str, mid: str = "") -> list[str]:
    """tests/record_run.py as 2 nodes of 1 process each, on loopback (torchrun, as a cluster's launcher
    starts one per node); rank 0's run dir is run_dir/node0. Their outputs."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    args = [*args, "trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
            "trainer.sync_batchnorm=false"]  # fmt: skip
    port = free_port()
    env = {**os.environ, "RECORD_DIR": str(record), "MID_AT": mid, **ONE_THREAD}
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "tests/record_run.py",
                *args,
                f"hydra.run.dir={run_dir / f'node{node}'}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:  # a node that never met the other waits for its rendezvous: do not leave it behind
        for node in nodes:
            node.kill() if node.poll() is None else None
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "folder"])
def test_ddp_two_ranks_read_disjoint_parts_and_a_mid_epoch_resume_is_exact(kind, ddp_data, tmp_path):
    """shards: the uninterrupted run is 2 nodes on loopback (trainer=multinode under torchrun), resumed as
    2-process DDP (trainer=ddp_cpu: the same 2 ranks); folder: both under trainer=ddp_cpu."""
    args = ddp_args(ddp_data[kind])
    if kind == "shards":
        two_nodes(tmp_path / "straight", tmp_path / "record", *args, mid="1,1")
        straight_dir = tmp_path / "straight" / "node0"
    else:
        straight = record_run(tmp_path / "straight", tmp_path / "record", *args, "trainer=ddp_cpu", mid="1,1")
        assert straight.returncode == 0, straight.stderr[-3000:]
        straight_dir = tmp_path / "straight"
    assert_disjoint_and_whole(seen(tmp_path / "record", 2), images=54, epochs=2)

    mid = straight_dir / "checkpoints" / "mid.ckpt"
    resumed = record_run(
        tmp_path / "resumed", tmp_path / "record2", *args, "trainer=ddp_cpu", f"ckpt_path={mid}"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "cannot skip ahead" not in resumed.stderr
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in
            (straight_dir, tmp_path / "resumed"))  # fmt: skip
    assert torch.load(mid, weights_only=False)["global_step"] == 6  # batch 1 of epoch 1 (4 an epoch)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    assert a["hyper_parameters"]["class_names"] == ["a", "b"]  # shards: from the manifest
    resumed_reads, straight_reads = seen(tmp_path / "record2", 2), seen(tmp_path / "record", 2)
    for rank in range(2):  # the resumed epoch read the rest of each rank's part, in the same order
        assert resumed_reads[rank]["1"] == straight_reads[rank]["1"][16:]


def test_a_mid_epoch_resume_on_another_world_size_warns(caplog):
    from types import SimpleNamespace

    from visiontune.training.callbacks import ResumeMidEpoch

    def trainer(world_size: int):
        sampler = EpochShuffleSampler(64, 0, batch_size=8, num_replicas=world_size)
        loader = SimpleNamespace(sampler=sampler, batch_size=8, num_workers=0)
        return SimpleNamespace(num_training_batches=8 // world_size, train_dataloader=loader, current_epoch=1,
                               world_size=world_size, fit_loop=None)  # fmt: skip

    saved = ResumeMidEpoch()
    saved.on_train_start(trainer(2), None)
    saved.completed = 2
    state = saved.state_dict()
    assert state == {"completed": 2, "world_size": 2, "batch_size": 8}
    for world_size, warns in ((2, False), (1, True)):
        resumed = ResumeMidEpoch()
        resumed.load_state_dict(state)
        caplog.clear()
        run = trainer(world_size)
        resumed.on_train_start(run, None)
        assert ("split otherwise" in caplog.text) is warns
        assert run.train_dataloader.sampler.skip == 16


def test_a_checkpoint_keeps_the_shards_geometry_so_its_transforms_need_no_shards(tmp_path):
    from visiontune.build import build_model
    from visiontune.data.datamodule import ImageDataModule
    from visiontune.models.backbones import backbone_data_config

    source = means_folder(tmp_path / "folder")
    write(tmp_path, tmp_path / "shards", "data=imagefolder", f"data.root={source}", "data.image_size=16",
          "data.crop_pct=0.875")  # fmt: skip
    cfg = compose_cfg(["data=shards", f"data.root={tmp_path / 'shards'}", *MODEL], tmp_path / "run")
    datamodule = build_datamodule(cfg)
    data = dict(build_model(cfg, datamodule).hparams.data)
    assert (data["image_size"], data["crop_pct"]) == (16, 0.875)  # from the manifest, not the backbone's

    shutil.rmtree(tmp_path / "shards")  # e.g. serving the model where the shards are not
    again = ImageDataModule(data, {"name": "none"}, backbone_data_config("timm:test_efficientnet"))
    assert again.eval_transform()(torch.zeros(3, 18, 18, dtype=torch.uint8)).shape == (3, 16, 16)
    with pytest.raises(UserError, match="does not exist"):
        again.classes  # noqa: B018 - reading the classes opens the shards


def test_shards_take_device_transforms_on_request_and_match_the_per_image_transform(tmp_path):
    source = noise_folder(tmp_path / "flat", per_class=6)
    write(tmp_path, tmp_path / "shards", "data=imagefolder", f"data.root={source}", "data.image_size=16",
          "data.crop_pct=0.875")  # fmt: skip
    per_image = shard_datamodule(tmp_path, tmp_path / "shards", "data.device_transforms=false")
    batched = shard_datamodule(tmp_path, tmp_path / "shards", "data.device_transforms=true")
    assert not shard_datamodule(tmp_path, tmp_path / "shards").enable_device_transforms("auto")
    assert batched.enable_device_transforms(True)
    items = [batched.val_set[i] for i in range(len(batched.val_set))]
    assert items[0][0].dtype == torch.uint8  # the loader sends uint8 images
    images = torch.stack([image for image, _ in items])
    out = batched.on_after_batch_transfer([images, torch.tensor([t for _, t in items])], 0)[0]
    expected = torch.stack([per_image.val_set[i][0] for i in range(len(per_image.val_set))])
    assert torch.allclose(out, expected, atol=1e-5)
