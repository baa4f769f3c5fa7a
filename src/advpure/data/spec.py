"""`DatasetSpec`: what the framework knows about one dataset (its registry is `advpure.data.sources.SPECS`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the framework needs to know about one dataset.

    `files` are the names expected inside the dataset directory (`subdir` for CIFAR, whose
    archive unpacks into a directory). `archives` maps each downloadable file name to its md5;
    it is fetched from `base_url + name`.
    """

    name: str
    format: str  # "idx", "cifar" or "imagenet"
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]  # per channel, images in [0, 1]; used by the classifier's normalization
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    base_url: str
    archives: tuple[tuple[str, str], ...]  # (file name, md5)
    subdir: str = ""  # directory the archive extracts to ("" when the archives are the files)
    train_size: int = 0
    test_size: int = 0
    root_layouts: tuple[str, ...] = ()  # other directories under data.root (torchvision's layout)

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self.base_url + name for name, _ in self.archives)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


__all__ = ["DatasetSpec"]
