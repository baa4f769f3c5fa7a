"""The ILSVRC2012 validation set (Russakovsky et al., IJCV 2015) as people have it, read offline.

Files (from https://image-net.org/download-images.php, ILSVRC2012; a free account, a login and
accepting the terms of access are required, so nothing is downloaded here):

  * `ILSVRC2012_img_val.tar` (6.3 GB) extracted to a folder of 50,000 JPEGs
    `ILSVRC2012_val_00000001.JPEG` ... `ILSVRC2012_val_00050000.JPEG`, flat (no class folders);
  * `ILSVRC2012_devkit_t12.tar.gz` extracted to `ILSVRC2012_devkit_t12/`, of which two files are read:
    `data/ILSVRC2012_validation_ground_truth.txt` (line i: the label of image i, an ILSVRC2012_ID in
    1..1000) and `data/meta.mat` (MATLAB; its `synsets` struct array maps each ILSVRC2012_ID to a
    WordNet id `WNID` and its `words`).

Where they are looked for: `data.root` (and `<data.root>/imagenet/`) when it is set, and nowhere
else; otherwise `<paths.data>/imagenet/`. In each such place the images may lie in
`ILSVRC2012_img_val/`, `val/` or directly in it; the devkit folder lies in it.

Labels. The devkit numbers the 1000 classes by ILSVRC2012_ID, an order of its own (ID 1 is
n02119789, kit fox). The PyTorch convention that ResNet-50 checkpoints (torchvision's, hence
RobustBench's `Standard_R50`) are trained with is torchvision's `ImageNet` / `ImageFolder`: one
folder per WNID, class index = rank of the WNID in sorted order (index 0 is n01440764, tench).
torchvision builds it from the same two devkit files (`parse_meta_mat`: the synsets with
`num_children == 0` are the 1000 classes; `parse_val_groundtruth_txt`; images moved into WNID
folders). So the label of image i here is: sorted WNIDs .index(WNID of ID ground_truth[i]).
A check for whoever has the real files: images 1, 2, 3 get 65, 970, 230 (the label lists that
circulate for the PyTorch convention say the same).

Preprocessing: torchvision's standard evaluation transform `Resize(256)`, `CenterCrop(224)`,
`ToTensor()` on the image decoded by Pillow and converted to RGB (what RobustBench's
`Res256Crop224` and DiffPure's ImageNet loader use): the shorter side to 256 and the longer to
int(256 * long / short), with Pillow's bilinear filter (antialiased: its support widens with the
downscaling factor); then the central 224 x 224 (offsets int(round((size - 224) / 2)) from the
top and left). Images are kept as uint8 (3, 224, 224); `ImageDataModule` divides by 255 on the
device, which is `ToTensor`'s [0, 1] scaling.

Only the images asked for are decoded (`ValImages`): the first `benchmark.n_images`, never all
50,000 at setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advpure.core.errors import DataError
from advpure.data.spec import DatasetSpec

VAL_IMAGES = 50_000
NUM_CLASSES = 1000
RESIZE, CROP = 256, 224
IMAGE_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"
META = f"{DEVKIT}/data/meta.mat"
IMAGE_FOLDERS = ("ILSVRC2012_img_val", "val", "")  # tried in this order under each location
DOWNLOAD_PAGE = "https://image-net.org/download-images.php"
GET_THEM = (
    f"both come from {DOWNLOAD_PAGE} (ILSVRC2012; an account, a login and accepting the terms of "
    "access are required, so nothing is downloaded automatically): extract them into {where}"
)

# ILSVRC2012 validation set only (advpure does not train on ImageNet): no train files, no download.
# Class names: the class indices here; the devkit's names (sorted-WNID order) come with the labels.
SPEC = DatasetSpec(
    name="imagenet",
    format="imagenet",
    channels=3,
    image_size=CROP,
    num_classes=NUM_CLASSES,
    mean=(0.485, 0.456, 0.406),  # RobustBench's / torchvision's ImageNet normalization (inside the nets)
    std=(0.229, 0.224, 0.225),
    class_names=tuple(str(k) for k in range(NUM_CLASSES)),
    train_files=(),
    test_files=(GROUND_TRUTH, META),
    base_url=DOWNLOAD_PAGE,
    archives=(),
    test_size=VAL_IMAGES,
)


def val_file_name(index: int) -> str:
    """The file name of validation image `index` (0-based): ILSVRC2012_val_<index + 1, 8 digits>.JPEG."""
    return f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def locations(root: str | Path | None, cache_dir: str | Path) -> list[Path]:
    """Where the files are looked for: `root` and `root/imagenet` when `root` is set (nothing else),
    else `<cache_dir>/imagenet`."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "imagenet"]
    return [Path(cache_dir).expanduser() / "imagenet"]


@dataclass(frozen=True)
class ValFiles:
    """Where the validation set's parts are: the JPEG folder and the two devkit files."""

    images: Path
    ground_truth: Path
    meta: Path


def _image_dirs(loc: Path) -> list[Path]:
    return [loc / f if f else loc for f in IMAGE_FOLDERS]


def _search(root, cache_dir) -> tuple[Path | None, Path | None, Path | None]:
    """(image folder, ground truth, meta.mat): the first place holding each, or None."""
    images = gt = meta = None
    for loc in locations(root, cache_dir):
        if images is None:
            images = next((d for d in _image_dirs(loc) if (d / val_file_name(0)).is_file()), None)
        if gt is None and (loc / GROUND_TRUTH).is_file():
            gt = loc / GROUND_TRUTH
        if meta is None and (loc / META).is_file():
            meta = loc / META
    return images, gt, meta


def missing(root: str | Path | None, cache_dir: str | Path) -> str | None:
    """One line naming what is missing and where it comes from, or None when every part is there."""
    images, gt, meta = _search(root, cache_dir)
    if images is not None and gt is not None and meta is not None:
        return None
    where = ", ".join(str(p) for p in locations(root, cache_dir))
    parts = []
    if images is None:
        folders = ", ".join(f"{f}/" for f in IMAGE_FOLDERS if f)
        parts.append(
            f"the images (a folder of {val_file_name(0)} ... {val_file_name(VAL_IMAGES - 1)}: {folders} or "
            f"the place itself; from {IMAGE_ARCHIVE}, 6.3 GB)"
        )
    lacking = [p for p, found in ((GROUND_TRUTH, gt), (META, meta)) if found is None]
    if lacking:
        parts.append(f"the devkit's {' and '.join(lacking)} (from {DEVKIT_ARCHIVE})")
    into = "data.root" if root is not None else f"{locations(root, cache_dir)[0]} (or set data.root)"
    return (
        f"imagenet: the ILSVRC2012 validation set is incomplete: {' and '.join(parts)} were not found "
        f"in {where}; {GET_THEM.format(where=into)}"
    )


def find_val(root: str | Path | None, cache_dir: str | Path) -> ValFiles:
    """The validation set's files; a one-line DataError naming what is missing otherwise."""
    problem = missing(root, cache_dir)
    if problem is not None:
        raise DataError(problem)
    images, gt, meta = _search(root, cache_dir)
    return ValFiles(images, gt, meta)  # type: ignore[arg-type]


def class_names(root: str | Path | None, cache_dir: str | Path) -> tuple[str, ...]:
    """The devkit's class names in sorted-WNID order when its meta.mat is found and readable, else
    the spec's (the class indices)."""
    meta = _search(root, cache_dir)[2]
    if meta is not None:
        try:
            return read_meta(meta).class_names
        except DataError:
            pass  # reported when the labels are read
    return SPEC.class_names


# --- the devkit --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Synsets:
    """The classes of the devkit: `wnids[k]` and `words[k]` of ILSVRC2012_ID k + 1 (devkit order)."""

    wnids: tuple[str, ...]
    words: tuple[str, ...]

    @property
    def sorted_index(self) -> torch.Tensor:
        """(K,) int64: the PyTorch class index (rank of the WNID in sorted order) of devkit ID k + 1."""
        order = sorted(range(len(self.wnids)), key=self.wnids.__getitem__)
        out = torch.empty(len(order), dtype=torch.long)
        out[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return out

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in PyTorch (sorted-WNID) order: the first of each class's `words` ("tench")."""
        ranked = sorted(zip(self.wnids, self.words))
        return tuple(w.split(",")[0].strip() for _, w in ranked)


def _field(synsets: np.ndarray, name: str, path: Path) -> list:
    if synsets.dtype.names is None or name not in synsets.dtype.names:
        have = ", ".join(synsets.dtype.names or ())
        raise DataError(f"{path}: the synsets struct has no field {name!r} (fields: {have or 'none'})")
    return [v.item() if isinstance(v, np.ndarray) and v.size == 1 else v for v in synsets[name].ravel()]


def read_meta(path: str | Path, num_classes: int = NUM_CLASSES) -> Synsets:
    """The devkit's `meta.mat`: the `num_classes` leaf synsets (num_children == 0), which must be the
    ILSVRC2012_IDs 1..num_classes with distinct WNIDs. One-line DataError otherwise."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises many types for a truncated or foreign file
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    synsets = mat.get("synsets")
    if not isinstance(synsets, np.ndarray):
        raise DataError(f"{path}: no 'synsets' struct array (the devkit's meta.mat has one)")
    ids = _field(synsets, "ILSVRC2012_ID", path)
    wnids = _field(synsets, "WNID", path)
    words = _field(synsets, "words", path)
    children = _field(synsets, "num_children", path)
    try:
        leaves = {int(i): (str(w), str(s)) for i, w, s, c in zip(ids, wnids, words, children) if int(c) == 0}
    except (TypeError, ValueError):
        raise DataError(f"{path}: ILSVRC2012_ID and num_children must be integers") from None
    if sorted(leaves) != list(range(1, num_classes + 1)):
        raise DataError(
            f"{path}: the leaf synsets (num_children == 0) have {len(leaves)} ILSVRC2012_IDs, "
            f"expected exactly 1..{num_classes}"
        )
    table = [leaves[i] for i in range(1, num_classes + 1)]
    if len({w for w, _ in table}) != num_classes:
        raise DataError(f"{path}: the {num_classes} classes do not have distinct WNIDs")
    return Synsets(tuple(w for w, _ in table), tuple(s for _, s in table))


def read_ground_truth(
    path: str | Path, num_classes: int = NUM_CLASSES, count: int = VAL_IMAGES
) -> torch.Tensor:
    """The devkit's ground truth: (count,) int64 ILSVRC2012_IDs in 1..num_classes, one a line. A file
    with another number of lines is an error (a truncated file must not shorten the set)."""
    path = Path(path)
    try:
        lines = path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        ids = torch.tensor([int(t) for t in lines], dtype=torch.long)
    except ValueError:
        raise DataError(f"{path}: expected one integer label per line") from None
    if len(ids) != count:
        raise DataError(f"{path}: {len(ids)} labels, expected {count} (one per validation image)")
    if len(ids) and (int(ids.min()) < 1 or int(ids.max()) > num_classes):
        raise DataError(f"{path}: labels range [{int(ids.min())}, {int(ids.max())}] outside 1..{num_classes}")
    return ids


# --- the images --------------------------------------------------------------------------------
def preprocess(image, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """torchvision's Resize(resize) + CenterCrop(crop) on a PIL image, as uint8 (3, crop, crop) RGB."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize * long / short)
    size = (resize, new_long) if w <= h else (new_long, resize)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    if w < crop or h < crop:
        raise ValueError(f"a {w}x{h} image cannot be center-cropped to {crop}; use resize >= crop")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode(path: Path, resize: int = RESIZE, crop: int = CROP) -> torch.Tensor:
    """One JPEG, decoded by Pillow and preprocessed (`preprocess`); one-line DataError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return preprocess(image, resize, crop)
    except FileNotFoundError:
        raise DataError(f"{path}: validation image not found (the folder lacks it)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None


class ValImages:
    """The validation images, indexed like a uint8 tensor (N, 3, crop, crop) and decoded on first use.

    `images[idx]` with a LongTensor / list / slice of 0-based indices gives (B, 3, crop, crop) uint8;
    an int gives one image. Decoded images are kept, so an image is decoded once per process.
    """

    def __init__(self, folder: str | Path, count: int = VAL_IMAGES, resize: int = RESIZE, crop: int = CROP):
        self.folder, self.count, self.resize, self.crop = Path(folder), int(count), resize, crop
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, 3, self.crop, self.crop)

    @property
    def decoded(self) -> int:
        """How many images were decoded so far."""
        return len(self._cache)

    def _one(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(f"validation image {i} outside [0, {self.count})")
        if i not in self._cache:
            self._cache[i] = decode(self.folder / val_file_name(i), self.resize, self.crop)
        return self._cache[i]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = range(*idx.indices(self.count))
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.dim() == 0:
            return self._one(int(idx))
        if idx.numel() == 0:
            return torch.zeros((0, 3, self.crop, self.crop), dtype=torch.uint8)
        return torch.stack([self._one(i) for i in idx.reshape(-1).tolist()])

    def decode(self, indices) -> None:
        """Decode `indices` now (e.g. the images a benchmark will use, so a bad file fails at setup)."""
        for i in torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist():
            self._one(i)


def load_val(
    root: str | Path | None, cache_dir: str | Path
) -> tuple[ValImages, torch.Tensor, tuple[str, ...]]:
    """(images, labels, class names) of the validation set: images decoded lazily (`ValImages`),
    labels (50000,) int64 in the sorted-WNID convention (0..999), names in the same order."""
    files = find_val(root, cache_dir)
    synsets = read_meta(files.meta)
    ids = read_ground_truth(files.ground_truth)
    return ValImages(files.images, len(ids)), synsets.sorted_index[ids - 1], synsets.class_names


__all__ = [
    "CROP",
    "RESIZE",
    "SPEC",
    "VAL_IMAGES",
    "Synsets",
    "ValFiles",
    "ValImages",
    "class_names",
    "decode",
    "find_val",
    "load_val",
    "locations",
    "missing",
    "preprocess",
    "read_ground_truth",
    "read_meta",
    "val_file_name",
]
