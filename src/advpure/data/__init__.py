"""Datasets: validated readers for the standard files (and the ImageNet validation set, `imagenet`),
the dataset registry with its file sources, on-device batch augmentation, and the self-sharding
`ImageDataModule`."""

from advpure.data.augment import crop_at, hflip_where, random_crop, random_hflip, to_unit
from advpure.data.imagenet import ValImages
from advpure.data.readers import read_cifar_batch, read_idx
from advpure.data.sources import (
    DEBIAN_FMNIST_DIR,
    SPECS,
    DatasetSpec,
    candidate_dirs,
    class_names,
    dataset_files,
    download_file,
    file_names,
    find_local,
    get_spec,
    load_arrays,
    resolve,
    root_dirs,
    unavailable,
)

_LIGHTNING = ("BatchDataset", "EvalBatchSampler", "ImageDataModule", "TrainBatchSampler", "is_empty_batch")


def __getattr__(name: str):
    """The data module's names load Lightning: imported on first use, so reading a config does not."""
    if name in _LIGHTNING:
        from advpure.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'advpure.data' has no attribute {name!r}")


__all__ = [
    "DEBIAN_FMNIST_DIR",
    "SPECS",
    "BatchDataset",
    "DatasetSpec",
    "EvalBatchSampler",
    "ImageDataModule",
    "TrainBatchSampler",
    "ValImages",
    "candidate_dirs",
    "class_names",
    "crop_at",
    "dataset_files",
    "download_file",
    "file_names",
    "find_local",
    "get_spec",
    "hflip_where",
    "is_empty_batch",
    "load_arrays",
    "random_crop",
    "random_hflip",
    "read_cifar_batch",
    "read_idx",
    "resolve",
    "root_dirs",
    "to_unit",
    "unavailable",
]
