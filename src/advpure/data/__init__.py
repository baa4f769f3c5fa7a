"""Datasets: validated readers for the standard files, the dataset registry with its file sources,
on-device batch augmentation, and the self-sharding `ImageDataModule`."""

from advpure.data.augment import crop_at, hflip_where, random_crop, random_hflip, to_unit
from advpure.data.datamodule import (
    BatchDataset,
    EvalBatchSampler,
    ImageDataModule,
    TrainBatchSampler,
    is_empty_batch,
)
from advpure.data.readers import read_cifar_batch, read_idx
from advpure.data.sources import (
    DEBIAN_FMNIST_DIR,
    SPECS,
    DatasetSpec,
    candidate_dirs,
    dataset_files,
    download_file,
    file_names,
    find_local,
    get_spec,
    load_arrays,
    resolve,
    root_dirs,
)

__all__ = [
    "DEBIAN_FMNIST_DIR",
    "SPECS",
    "BatchDataset",
    "DatasetSpec",
    "EvalBatchSampler",
    "ImageDataModule",
    "TrainBatchSampler",
    "candidate_dirs",
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
]
