"""`Indexed`: a dataset's items with their index in front, so in-order batches can skip unreadable
files (None) and still say which item each row is."""

from __future__ import annotations

from torch.utils.data import Dataset


class Indexed(Dataset):
    """(index, *item) of a dataset whose items may be None (an unreadable file): the index survives."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, *item)
