"""Data: splits (pure), files (scanning and checks), standard (the registry of in-memory datasets),
checks (the data settings' rules), images (decoding), transforms, caches, stand-in datasets (wrapped),
batched device transforms, and the DataModule.

The names below load on first use, so `visiontune.data.images` (numpy and PIL only) can be imported
by a deployment without torch.
"""

from importlib import import_module

_EXPORTS = {
    "EpochShuffleSampler": "datamodule",
    "ImageDataModule": "datamodule",
    "FileImageDataset": "files",
    "check_image": "files",
    "load_image": "files",
    "read_csv_list": "files",
    "read_metadata": "files",
    "scan_csv": "files",
    "scan_folder": "files",
    "scan_metadata": "files",
    "stratified_partition": "splits",
    "stratified_split": "splits",
    "stratified_subset": "splits",
    "FASHION_CLASSES": "standard",
    "STANDARD": "standard",
    "StandardDataset": "standard",
    "TensorImageDataset": "standard",
    "load_standard": "standard",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
