"""A dataset served in place of another one, which keeps answering for it."""

from __future__ import annotations

from torch.utils.data import Dataset


class WrappedDataset(Dataset):
    """A stand-in for the dataset `self.base` (its decoded images, its cached features, ...).

    Every attribute the stand-in does not have itself is the base's: `labels`, `targets`, `paths`,
    `target(i)`, so code that reads them (class-balanced sampling, class counts, task targets) works
    on either one. A subclass sets `self.base` in its `__init__`.
    """

    base: Dataset

    def __getattr__(self, name):
        if name == "base":  # not set yet (e.g. while unpickling): no attribute, not endless recursion
            raise AttributeError(name)
        return getattr(self.base, name)
