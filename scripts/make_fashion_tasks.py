"""Make the two task demonstrations from Fashion-MNIST's own images and labels (seeded).

    python scripts/make_fashion_tasks.py [--out data/fashion_tasks] [--train 10000] [--val 1000] [--test 2000]

- <out>/multitask/{train,val,test}.csv: `path,class,group`: each Fashion-MNIST image with its class
  and a coarse group that follows from it (tops, bottoms, footwear, bags); 28 px PNGs in images/.
- <out>/mosaic/{train,val,test}.csv: `path,labels`: 2x2 mosaics (56 px) of four random items, labelled
  with the set of classes present, separated by `|`.

train and val images come from Fashion-MNIST's training set, test images from its test set.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from visiontune.data.standard import FASHION_CLASSES, load_standard

GROUPS = {
    "tops": ["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"],
    "bottoms": ["Trouser"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bags": ["Bag"],
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}


def mosaic(images: np.ndarray) -> np.ndarray:
    """Four (28, 28) images -> one (56, 56) image, in reading order."""
    return np.block([[images[0], images[1]], [images[2], images[3]]])


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def make_multitask(out: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = FASHION_CLASSES[int(label)]
        path = folder / f"{i:05d}.png"
        Image.fromarray(image).save(path)
        rows.append([str(path.relative_to(out)), name, GROUP_OF[name]])
    write_csv(out / f"{split}.csv", ["path", "class", "group"], rows)


def make_mosaics(out: Path, split: str, images: np.ndarray, labels: np.ndarray, n: int, rng) -> None:
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pick = rng.integers(0, len(images), size=4)
        path = folder / f"{i:05d}.png"
        Image.fromarray(mosaic(images[pick])).save(path)
        present = sorted({FASHION_CLASSES[int(c)] for c in labels[pick]})
        rows.append([str(path.relative_to(out)), "|".join(present)])
    write_csv(out / f"{split}.csv", ["path", "labels"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/fashion_tasks"))
    parser.add_argument("--root", type=Path, default=Path("data"), help="where Fashion-MNIST is (or goes)")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = (t.numpy() for t in load_standard("fashion_mnist", args.root, train=True))
    x_test, y_test = (t.numpy() for t in load_standard("fashion_mnist", args.root, train=False))
    x_train, x_test = x_train[:, 0], x_test[:, 0]  # (N, 28, 28) uint8
    order = rng.permutation(len(x_train))
    train, val = order[: args.train], order[args.train : args.train + args.val]
    test = rng.permutation(len(x_test))[: args.test]
    multitask = args.out / "multitask"
    for split, (x, y, idx) in {"train": (x_train, y_train, train), "val": (x_train, y_train, val),
                               "test": (x_test, y_test, test)}.items():  # fmt: skip
        make_multitask(multitask, split, x[idx], y[idx])
    mosaics = args.out / "mosaic"
    pool = {"train": (x_train[train], y_train[train]), "val": (x_train[val], y_train[val]),
            "test": (x_test[test], y_test[test])}  # fmt: skip
    for split, n in (("train", args.train), ("val", args.val), ("test", args.test)):
        make_mosaics(mosaics, split, *pool[split], n, rng)
    print(f"wrote {multitask}/{{train,val,test}}.csv and {mosaics}/{{train,val,test}}.csv")


if __name__ == "__main__":
    main()
