"""A tiny stand-in for the ILSVRC2012 validation set, in the layout people have it: a flat folder of
`ILSVRC2012_val_%08d.JPEG` files and the devkit's `ILSVRC2012_devkit_t12/data/` with the ground-truth
list and a `meta.mat` written with scipy.io.savemat in the devkit's struct layout (a `synsets`
struct array, one row per synset, fields as in the real file; the 1000 classes are the leaves).

The fake WNIDs are chosen so that the devkit order differs from the sorted order: three real ones
(ILSVRC2012_ID 1 = n02119789 kit fox, 490 = n01751748 sea snake, and n01440764 tench) and 997
made-up ones sorting after them. In the sorted-WNID (PyTorch) convention tench is 0, sea snake 1,
kit fox 2.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)
KIT_FOX, SEA_SNAKE, TENCH = "n02119789", "n01751748", "n01440764"
TENCH_ID = 7  # where the fake devkit puts tench (the real devkit's ID differs; only the rule matters)


def fake_wnids(seed: int = 0) -> list[str]:
    """1000 distinct WNIDs in devkit order (index k = ILSVRC2012_ID k + 1)."""
    rng = random.Random(seed)
    made_up = rng.sample(range(3_000_000, 9_999_999), 997)
    wnids = [f"n{v:08d}" for v in made_up]
    wnids.insert(0, KIT_FOX)  # ID 1
    wnids.insert(TENCH_ID - 1, TENCH)
    wnids.insert(489, SEA_SNAKE)  # ID 490
    return wnids


def write_meta(path: Path, wnids: list[str], *, leaves: int | None = None, shuffle: bool = True) -> Path:
    """meta.mat with the classes `wnids` (IDs 1..K, leaves) plus two inner synsets (IDs K+1, K+2);
    rows in shuffled order (the reader must go by the ID field). `leaves` < K marks only that many
    classes as leaves (a broken file)."""
    import scipy.io

    k = len(wnids)
    rows = [
        (
            i + 1,
            w,
            f"class {w}, also {i + 1}",
            "gloss",
            0 if (leaves is None or i < leaves) else 1,
            [],
            0,
            1300,
        )
        for i, w in enumerate(wnids)
    ]
    rows += [(k + 1, "n00001740", "entity", "gloss", 2, [1, 2], 19, 0)]
    rows += [(k + 2, "n00002137", "abstraction", "gloss", 1, [3], 18, 0)]
    if shuffle:
        random.Random(1).shuffle(rows)
    table = np.zeros((len(rows), 1), dtype=[(f, object) for f in FIELDS])
    for r, (i, w, words, gloss, nc, ch, height, ntrain) in enumerate(rows):
        table[r, 0] = (
            np.uint16(i),
            w,
            words,
            gloss,
            np.uint8(nc),
            np.array(ch, dtype=np.uint16).reshape(1, -1),
            np.uint8(height),
            np.uint16(ntrain),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})
    return path


def write_devkit(
    root: Path, first_ids: list[int], *, count: int = 50_000, seed: int = 0, wnids=None
) -> list[int]:
    """The devkit under `root`: meta.mat and a ground truth of `count` lines starting with `first_ids`
    (the rest random). Returns the ILSVRC2012_IDs written."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    write_meta(data / "meta.mat", wnids or fake_wnids(seed))
    rng = random.Random(seed)
    ids = list(first_ids) + [rng.randint(1, 1000) for _ in range(count - len(first_ids))]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


def write_images(
    folder: Path, sizes: list[tuple[int, int]], *, fmt: str = "JPEG", seed: int = 0
) -> list[Path]:
    """Images 1..len(sizes) as ILSVRC2012_val_%08d.JPEG (content in `fmt`: JPEG, or PNG for exact
    pixels; the reader goes by content, as Pillow does), size (width, height), smooth random content."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = [np.sin(xx / (7 + 3 * c) + yy / (11 + c)) for c in range(3)]
        noise = rng.integers(0, 40, size=(h, w, 3))
        arr = np.clip(np.stack(base, -1) * 100 + 128 + noise - 20, 0, 255).astype(np.uint8)
        path = folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        Image.fromarray(arr).save(path, format=fmt)
        out.append(path)
    return out
