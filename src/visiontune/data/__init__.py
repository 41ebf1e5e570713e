"""Data: splits (pure), files (scanning and checks), standard (in-memory datasets), the DataModule."""

from visiontune.data.datamodule import EpochShuffleSampler, ImageDataModule
from visiontune.data.files import (
    FileImageDataset,
    check_image,
    load_image,
    read_csv_list,
    scan_csv,
    scan_folder,
)
from visiontune.data.splits import stratified_split, stratified_subset
from visiontune.data.standard import FASHION_CLASSES, STANDARD, TensorImageDataset, load_standard

__all__ = [
    "FASHION_CLASSES",
    "STANDARD",
    "EpochShuffleSampler",
    "FileImageDataset",
    "ImageDataModule",
    "TensorImageDataset",
    "check_image",
    "load_image",
    "load_standard",
    "read_csv_list",
    "scan_csv",
    "scan_folder",
    "stratified_split",
    "stratified_subset",
]
