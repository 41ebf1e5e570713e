"""The augment preview: a PNG grid of augmented training samples, from the same config as a run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visiontune.preview import main


def write_csv_dataset(root):
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for c in ("cat", "dog"):
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"{c}{i}.png")
            lines.append(f"{c}{i}.png,{c}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


@pytest.mark.parametrize(
    ("augment", "n", "grid"),
    [
        ("basic", 5, (5, 1)),
        ("mixup", 10, (8, 2)),
        ("augmix augment.jsd=true", 4, (3, 4)),
    ],  # jsd: 3 views a row
)
def test_preview_writes_a_grid_of_augmented_samples(tmp_path, capsys, augment, n, grid):
    out = tmp_path / "out" / "preview.png"
    csv_path = write_csv_dataset(tmp_path)
    main(["data=csv", f"data.root={csv_path}", "model=resnet18", "data.image_size=32",
          *f"augment={augment}".split(), "--n", str(n), "--out", str(out)])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        cols, rows = grid  # make_grid pads each 32 px tile by 2 px
        assert image.format == "PNG" and image.size == (cols * 34 + 2, rows * 34 + 2)
        assert image.mode == "RGB"


def test_preview_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "data=csv",
                f"data.root={tmp_path / 'nope.csv'}",
                "model=resnet18",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.root") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
