"""The dataset registry and where each dataset's files come from.

Where the files come from:
  * `data.root` set: that copy and nothing else. The files directly in it, in `<root>/<name>/`,
    in the directory an archive extracts to (`<root>/cifar-10-batches-py/`), or torchvision's
    layout (`<root>/MNIST/raw/`, `<root>/FashionMNIST/raw/`); a CIFAR tarball lying in root is
    checked (md5) and extracted into the cache `<paths.data>/<name>/`. A root that holds none of
    these is a `DataError` naming what is missing there: never silently replaced by another copy.
  * `data.root` unset, the first place that has *all* files of the dataset wins:
      1. the download cache `<paths.data>/<name>/`;
      2. Fashion-MNIST only: the Debian package's directory (`apt-get install dataset-fashion-mnist`);
      3. a download from the canonical URL into the cache, when `data.download` is true;
      4. otherwise a `DataError` that lists the files expected, where they were looked for and how
         to get them.

The ImageNet validation set (`imagenet`) cannot be downloaded (login required): it is found in
`data.root` or the cache only, laid out as `advpure.data.imagenet` describes, and its images are
decoded lazily (`load_arrays` returns them as `ValImages`).

IDX files are found compressed or not, under the canonical name (`train-images-idx3-ubyte.gz`),
without `.gz`, or with the dotted spelling some mirrors use (`train-images.idx3-ubyte`); the
reader tells gzip from raw by content.

Checksums apply to downloads only. Local files are validated structurally by the readers (gzip
CRC, IDX header and payload length, CIFAR array shapes): the Debian package re-compresses the
Fashion-MNIST files, so their md5s differ from upstream while their content is identical.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path, PurePosixPath

import torch

from advpure.core.errors import DataError
from advpure.core.fsio import temp_file_beside
from advpure.data import imagenet
from advpure.data.readers import read_cifar_batch, read_idx
from advpure.data.spec import DatasetSpec

DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # module constant: tests patch it
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


_IDX_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
_IDX_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_spec(name, *, mean, std, class_names, base_url, md5, root_layout) -> DatasetSpec:
    """A 28x28 grey, 10-class dataset in LeCun's IDX format (MNIST, Fashion-MNIST): 60,000 training
    and 10,000 test images; `md5` of the four gzipped files in (train images, train labels, test
    images, test labels) order."""
    return DatasetSpec(
        name=name,
        format="idx",
        channels=1,
        image_size=28,
        num_classes=10,
        mean=(mean,),
        std=(std,),
        class_names=tuple(class_names),
        train_files=_IDX_TRAIN,
        test_files=_IDX_TEST,
        base_url=base_url,
        archives=tuple(zip((*_IDX_TRAIN, *_IDX_TEST), md5)),
        train_size=60000,
        test_size=10000,
        root_layouts=(root_layout,),
    )


_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray "
    "road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle "
    "wardrobe whale willow_tree wolf woman worm"
).split()

SPECS: dict[str, DatasetSpec] = {
    "fmnist": _idx_spec(
        "fmnist",
        mean=0.2860,
        std=0.3530,
        class_names="T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag|Ankle boot".split("|"),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5=(
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
        root_layout="FashionMNIST/raw",
    ),
    "mnist": _idx_spec(
        "mnist",
        mean=0.1307,
        std=0.3081,
        class_names=[str(d) for d in range(10)],
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5=(
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        root_layout="MNIST/raw",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        format="cifar",
        channels=3,
        image_size=32,
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=tuple("airplane automobile bird cat deer dog frog horse ship truck".split()),
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        subdir="cifar-10-batches-py",
        train_size=50000,
        test_size=10000,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        format="cifar",
        channels=3,
        image_size=32,
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        class_names=tuple(_CIFAR100_CLASSES),
        train_files=("train",),
        test_files=("test",),
        base_url="https://www.cs.toronto.edu/~kriz/",
        archives=(("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        subdir="cifar-100-python",
        train_size=50000,
        test_size=10000,
    ),
    "imagenet": imagenet.SPEC,  # the ILSVRC2012 validation set (advpure.data.imagenet)
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown dataset '{name}'; known: {', '.join(SPECS)}") from None


# --- finding local copies -----------------------------------------------------------------------
def file_names(spec: DatasetSpec, name: str) -> tuple[str, ...]:
    """The names one expected file may have on disk, in the order they are tried.

    IDX: `x-idx3-ubyte.gz`, `x-idx3-ubyte`, and the dotted `x.idx3-ubyte` (+ `.gz`). CIFAR: as is.
    """
    if spec.format != "idx":
        return (name,)
    base = name.removesuffix(".gz")
    stem, _, kind = base.rpartition("-idx")
    dotted = f"{stem}.idx{kind}"
    return (f"{base}.gz", base, dotted, f"{dotted}.gz")


def _find_file(d: Path, spec: DatasetSpec, name: str) -> Path | None:
    for alt in file_names(spec, name):
        if (d / alt).is_file():
            return d / alt
    return None


def dataset_files(spec: DatasetSpec, d: str | Path) -> dict[str, Path] | None:
    """{expected name: the file in `d` that holds it} when `d` has every file, else None."""
    d = Path(d)
    found = {f: _find_file(d, spec, f) for f in spec.files}
    return found if all(found.values()) else None  # type: ignore[return-value]


def _dirs_in(location: Path, spec: DatasetSpec) -> list[Path]:
    """Directories under one location that may hold the files: `<loc>/<subdir>` first, then `<loc>`."""
    return [location / spec.subdir, location] if spec.subdir else [location]


def root_dirs(spec: DatasetSpec, root: str | Path) -> list[Path]:
    """The directories under a user-given `data.root` that may hold the files, in order."""
    root = Path(root).expanduser()
    return [*_dirs_in(root, spec), *_dirs_in(root / spec.name, spec), *(root / r for r in spec.root_layouts)]


def candidate_dirs(spec: DatasetSpec, root: str | Path | None, cache_dir: str | Path) -> list[Path]:
    """Where the files are looked for, in order: only under `root` when it is set (see the module
    docstring), else the cache and, for Fashion-MNIST, the Debian package's directory."""
    if root is not None:
        return root_dirs(spec, root)
    out = _dirs_in(Path(cache_dir).expanduser() / spec.name, spec)
    if spec.name == "fmnist":
        out.append(DEBIAN_FMNIST_DIR)
    return out


def find_local(spec: DatasetSpec, root: str | Path | None, cache_dir: str | Path) -> Path | None:
    """The first candidate directory that holds all of the dataset's files, or None."""
    for d in candidate_dirs(spec, root, cache_dir):
        if dataset_files(spec, d) is not None:
            return d
    return None


# --- downloading --------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _NetworkError(Exception):
    """A download that failed for reasons outside the file's content (unreachable, HTTP error)."""


def download_file(url: str, dest: Path, md5: str) -> Path:
    """Stream `url` to a temp file next to `dest`, check its md5, then rename it into place.

    The rename is atomic, so `dest` either does not exist or is complete and verified; a crash
    or a checksum mismatch leaves no partial file behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(dest, suffix=".part")  # mode 0666 & ~umask, not mkstemp's 0600
    try:
        h = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                while chunk := resp.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise _NetworkError(f"download of {url} failed ({reason})") from None
        got = h.hexdigest()
        if got != md5:
            raise DataError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {got}; the download was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    p = PurePosixPath(member.name)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{archive}: refusing to extract member with unsafe path '{member.name}'")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing to extract '{member.name}' (not a regular file or directory)")


def extract_tar(archive: Path, dest_dir: Path, spec: DatasetSpec) -> Path:
    """Extract a CIFAR tarball safely into `dest_dir`; returns `dest_dir / spec.subdir`.

    Every member is checked first (no absolute paths, no `..`, no links or devices). Extraction
    goes to a temp directory that is renamed into place, so a half-extracted tree never looks
    like a complete dataset.
    """
    target = dest_dir / spec.subdir
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest_dir))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(archive, m)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: cannot extract ({e})") from None
        missing = [f for f in spec.files if not (tmp / spec.subdir / f).is_file()]
        if missing:
            raise DataError(f"{archive}: archive lacks {spec.subdir}/{', '.join(missing)}")
        if target.exists():
            if all((target / f).is_file() for f in spec.files):
                return target  # another process (e.g. a second node's rank 0) finished first
            shutil.rmtree(target)  # an incomplete copy
        os.replace(tmp / spec.subdir, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download(spec: DatasetSpec, cache: Path) -> Path:
    """Fetch the missing archives into `cache` (verified), extracting tarballs; returns the file dir."""
    for name, md5 in spec.archives:
        path = cache / name
        if not path.is_file():
            download_file(spec.base_url + name, path, md5)
        if spec.subdir:
            extract_tar(path, cache, spec)
    return cache / spec.subdir if spec.subdir else cache


def _cached_archive(spec: DatasetSpec, cache: Path) -> Path | None:
    """A CIFAR tarball already in the cache but not extracted (e.g. an interrupted run)."""
    if not spec.subdir:
        return None
    for name, md5 in spec.archives:
        path = cache / name
        if path.is_file():
            got = _md5(path)
            if got != md5:
                raise DataError(f"{path}: md5 {got} differs from the expected {md5}; delete it")
            return extract_tar(path, cache, spec)
    return None


def _not_found(spec: DatasetSpec, root, cache_dir, reason: str | None) -> DataError:
    where = ", ".join(str(d) for d in candidate_dirs(spec, root, cache_dir))
    files = ", ".join(f"{spec.subdir}/{f}" if spec.subdir else f for f in spec.files)
    how = []
    if spec.name == "fmnist":
        how.append("`apt-get install dataset-fashion-mnist`")
    unpack = ", extract it" if spec.subdir else ""
    how.append(f"download {' '.join(spec.urls)}{unpack} and put the files in data.root")
    if reason is None:
        how.append("set data.download=true")
    why = f" ({reason})" if reason else ""
    return DataError(
        f"{spec.name}: dataset files not found{why}; expected {files} in one of: {where}; "
        f"to get them: {'; or '.join(how)}"
    )


def _root_tarball(spec: DatasetSpec, root: Path, cache_dir: str | Path) -> Path | None:
    """A CIFAR tarball in `root` (or `<root>/<name>/`): its extracted copy in the cache, made now
    (after checking its md5) or by an earlier run."""
    if not spec.subdir:
        return None
    cache = Path(cache_dir).expanduser() / spec.name
    for name, md5 in spec.archives:
        for tarball in (root / name, root / spec.name / name):
            if not tarball.is_file():
                continue
            if dataset_files(spec, cache / spec.subdir) is not None:
                return cache / spec.subdir
            got = _md5(tarball)
            if got != md5:
                raise DataError(
                    f"data.root: {tarball} has md5 {got}, not the published {md5}: "
                    "an incomplete or different download"
                )
            cache.mkdir(parents=True, exist_ok=True)
            return extract_tar(tarball, cache, spec)
    return None


def _not_in_root(spec: DatasetSpec, root: Path) -> DataError:
    """One line: what is missing in the user's `data.root`, in the directory closest to complete."""
    if not root.is_dir():
        return DataError(f"data.root={root}: no such directory (it should hold the {spec.name} files)")
    dirs = root_dirs(spec, root)
    best = max(dirs, key=lambda d: sum(_find_file(d, spec, f) is not None for f in spec.files))
    missing = [f for f in spec.files if _find_file(best, spec, f) is None]
    if len(missing) < len(spec.files):
        what = f"{best} lacks {', '.join(missing)}"
    else:
        what = f"none of {', '.join(spec.files)} in {', '.join(str(d) for d in dirs)}"
    also = " (or uncompressed)" if spec.format == "idx" else f", or the archive {spec.archives[0][0]}"
    return DataError(
        f"data.root={root} does not hold the {spec.name} dataset: {what}{also}; "
        "fix data.root, or unset it to use the cache in paths.data (and the download)"
    )


def resolve(name: str, root: str | Path | None, cache_dir: str | Path, download: bool = True) -> Path:
    """The directory holding all of the dataset's files (downloading them if allowed and needed).

    With `root` (`data.root`) only that copy is used; otherwise `cache_dir` (`paths.data`:
    downloads go to `<cache_dir>/<name>/`), the Debian copy, then a download. Raises a one-line
    `DataError` saying what is missing where.
    """
    spec = get_spec(name)
    if spec.format == "imagenet":
        return imagenet.find_val(root, cache_dir).images
    if root is not None:
        root = Path(root).expanduser()
        found = find_local(spec, root, cache_dir)
        if found is None and root.is_dir():
            found = _root_tarball(spec, root, cache_dir)
        if found is None:
            raise _not_in_root(spec, root)
        return found
    found = find_local(spec, root, cache_dir)
    if found is not None:
        return found
    cache = Path(cache_dir).expanduser() / spec.name
    extracted = _cached_archive(spec, cache) if cache.is_dir() else None
    if extracted is not None:
        return extracted
    if not download:
        raise _not_found(spec, root, cache_dir, None)
    try:
        return _download(spec, cache)
    except _NetworkError as e:
        raise _not_found(spec, root, cache_dir, str(e)) from None


# --- loading ------------------------------------------------------------------------------------
def _load_idx_pair(spec: DatasetSpec, images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(images), read_idx(labels)
    if x.dim() != 3 or tuple(x.shape[1:]) != (spec.image_size, spec.image_size):
        side = spec.image_size
        raise DataError(f"{images}: image array has shape {tuple(x.shape)}, expected (N, {side}, {side})")
    if y.dim() != 1:
        raise DataError(f"{labels}: label array has shape {tuple(y.shape)}, expected (N,)")
    if len(x) != len(y):
        raise DataError(f"{images}: {len(x)} images but {labels.name} has {len(y)} labels")
    if len(y) and int(y.max()) >= spec.num_classes:
        raise DataError(f"{labels}: label {int(y.max())} outside [0, {spec.num_classes})")
    return x.unsqueeze(1), y.long()


def _load_cifar(spec: DatasetSpec, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_batch(f, spec.num_classes) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_arrays(
    name: str, root: str | Path | None = None, cache_dir: str | Path = "data", download: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): uint8 images (N, C, H, W) and int64 labels.

    `imagenet`: no training images (empty tensors); test_x is the validation set as `ValImages`
    (indexed like a uint8 tensor, each image decoded on first use), test_y its sorted-WNID labels."""
    spec = get_spec(name)
    if spec.format == "imagenet":
        x, y, _ = imagenet.load_val(root, cache_dir)
        empty = torch.zeros((0, *spec.shape), dtype=torch.uint8)
        return empty, torch.zeros(0, dtype=torch.long), x, y  # type: ignore[return-value]
    d = resolve(name, root, cache_dir, download)
    files = dataset_files(spec, d)
    if files is None:  # pragma: no cover - resolve returns only complete directories
        raise DataError(f"{d}: dataset files disappeared while loading")
    if spec.format == "idx":
        tr = _load_idx_pair(spec, files[spec.train_files[0]], files[spec.train_files[1]])
        te = _load_idx_pair(spec, files[spec.test_files[0]], files[spec.test_files[1]])
    else:
        tr = _load_cifar(spec, [files[f] for f in spec.train_files])
        te = _load_cifar(spec, [files[f] for f in spec.test_files])
    return tr[0].contiguous(), tr[1], te[0].contiguous(), te[1]


def unavailable(name: str, root: str | Path | None, cache_dir: str | Path) -> str | None:
    """One line naming the dataset files that are missing and cannot be downloaded (the ImageNet
    validation set: login required), or None. Checked before any work, beside the weights."""
    return imagenet.missing(root, cache_dir) if get_spec(name).format == "imagenet" else None


def class_names(name: str, root: str | Path | None, cache_dir: str | Path) -> tuple[str, ...]:
    """The dataset's class names (ImageNet: the devkit's when found; see `imagenet.class_names`)."""
    spec = get_spec(name)
    return imagenet.class_names(root, cache_dir) if spec.format == "imagenet" else spec.class_names
