"""Data faults: all-unreadable batches are skipped, a non-UTF-8 CSV and strict-mode bad files are one line."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visiontune.data.files import FileImageDataset, collate_skip_none, read_csv_list, scan_folder
from visiontune.errors import UserError


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def write_images(folder, names, good: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        path = folder / name
        if good:
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        else:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " + bytes(range(64)))
        paths.append(str(path))
    return paths


def test_a_batch_of_only_unreadable_files_is_skipped_with_one_warning():
    with pytest.warns(UserWarning, match="skipping a batch: all 3 of its images were unreadable") as record:
        assert collate_skip_none([None, None, None]) is None
    assert len(record) == 1
    x, y = collate_skip_none([None, (torch.ones(3), 1), (torch.zeros(3), 0)])
    assert x.shape == (2, 3) and y.tolist() == [1, 0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_over_corrupt_files_iterates_without_raising(tmp_path, workers):
    bad = write_images(tmp_path / "bad", [f"{i}.jpg" for i in range(5)], good=False)
    good = write_images(tmp_path / "good", ["a.png", "b.png"])
    dataset = FileImageDataset(bad + good, [0] * 5 + [1, 1], transform=to_tensor)
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate_skip_none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    # [bad, bad], [bad, bad], [bad, good], [good]
    assert [b is None for b in batches] == [True, True, False, False]
    assert [b[1].tolist() for b in batches[2:]] == [[1], [1]]


def test_a_csv_that_is_not_utf8_names_the_file_the_byte_and_the_line(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes("path,label\nimg/1.png,cat\nimg/caf\xe9.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError) as info:
        read_csv_list(csv_path)
    message = str(info.value)
    offset = csv_path.read_bytes().index(b"\xe9")
    assert "\n" not in message and str(csv_path) in message
    assert f"byte 0xe9 at offset {offset} (line 3)" in message and "Save the file as UTF-8" in message


def test_a_utf8_csv_with_a_byte_order_mark_still_reads(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfpath,label\nimg/1.png,caf\xc3\xa9\n")
    paths, labels = read_csv_list(csv_path)
    assert paths == [str(tmp_path / "img/1.png")] and labels == ["café"]
    csv_path.write_bytes(b"\xef\xbb\xbfpath,label\nimg/1.png,caf\xe9\n")
    with pytest.raises(UserError, match=r"offset 27 \(line 2\)"):  # the offset counts the 3-byte mark
        read_csv_list(csv_path)
    assert csv_path.read_bytes().index(b"\xe9") == 27


def test_strict_bad_files_are_one_line_with_the_listing_in_details(tmp_path):
    root = tmp_path / "train"
    write_images(root / "cat", ["0.png", "1.png"])
    write_images(root / "dog", ["0.png", "1.png"])
    write_images(root / "dog", ["broken.jpg"], good=False)
    (root / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as info:
        scan_folder(root, strict=True)
    message, details = str(info.value), info.value.details
    assert "\n" not in message
    assert message.startswith(f"2 bad files under {root}") and "set data.strict=false to skip them" in message
    lines = details.splitlines()
    assert len(lines) == 2 and any("notes.txt (not an image file)" in ln for ln in lines)
    assert any("broken.jpg (unreadable" in ln for ln in lines)


def test_user_error_details_are_optional_and_survive_pickling():
    assert UserError("plain").details is None and str(UserError("plain")) == "plain"
    error = pickle.loads(pickle.dumps(UserError("one line", details="a\nb")))
    assert str(error) == "one line" and error.details == "a\nb"
