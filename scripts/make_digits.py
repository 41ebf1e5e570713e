"""Write scikit-learn's handwritten digits (1,797 real 8x8 scans, UCI) as an image folder.

    .venv/bin/pip install scikit-learn
    .venv/bin/python scripts/make_digits.py [--out data/digits]

The folder has train/ (70%), val/ (15%) and test/ (15%), each with one sub-folder per digit, split
stratified with seed 0, so `data=imagefolder data.root=data/digits` trains on it. The images are
the dataset's 17 grey levels scaled to 0-255, saved at 32 px (nearest neighbour: the 8x8 pixels
stay sharp; the data transforms resize them to the run's image size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/digits")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0, "test": 0}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = n_test = round(0.15 * len(index))
        parts = {
            "test": index[:n_test],
            "val": index[n_test : n_test + n_val],
            "train": index[n_test + n_val :],
        }
        for split, chosen in parts.items():
            folder = Path(args.out) / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i]).resize((32, 32), Image.NEAREST).save(folder / f"{i:04d}.png")
            counts[split] += len(chosen)
    print(
        f"wrote {sum(counts.values())} digits to {args.out}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )


if __name__ == "__main__":
    main()
