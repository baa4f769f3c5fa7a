"""Tests of the data layer: file readers, sources (order, download, checksums), augmentation and
the self-sharding datamodule. All but one test use tiny files written here; the real
Fashion-MNIST test reads the Debian package's copy."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from advpure.config.compose import DataConfig, PathsConfig
from advpure.core.errors import DataError
from advpure.data import (
    ImageDataModule,
    crop_at,
    get_spec,
    hflip_where,
    is_empty_batch,
    load_arrays,
    random_crop,
    random_hflip,
    read_cifar_batch,
    read_idx,
    resolve,
    sources,
    to_unit,
)
from conftest import needs_fmnist

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --- helpers ------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_idx_dataset(
    d: Path, n_train: int, n_test: int, seed: int = 0, names: tuple[str, ...] = IDX_FILES
) -> dict[str, np.ndarray]:
    """A Fashion-MNIST/MNIST shaped dataset with `n_train` / `n_test` random images, written under
    `names` (gzip-compressed when a name ends in .gz)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (rng.permutation(n_test) % 10).astype(np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, key in zip(names, ("train_x", "train_y", "test_x", "test_y")):
        write_idx(d / name, arrays[key])
    return arrays


def write_cifar(path: Path, data, labels, label_key: bytes = b"labels", protocol=None) -> Path:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", label_key: labels, b"data": data}, f, protocol=protocol)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def files_under(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []


# --- IDX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    x = read_idx(write_idx(tmp_path / f"images{suffix}", images))
    y = read_idx(write_idx(tmp_path / f"labels{suffix}", labels))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (7, 5, 3)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def _truncated_gz(p: Path):
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 4), np.uint8)))[:-20])


def _bad_crc(p: Path):
    raw = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(20, 10))))
    raw[-8] ^= 0xFF  # first byte of the CRC32 trailer
    p.write_bytes(bytes(raw))


def _corrupt_stream(p: Path):
    raw = bytearray(
        gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)))
    )
    raw[len(raw) // 2] ^= 0x55  # a byte inside the deflate stream
    p.write_bytes(bytes(raw))


def _wrong_magic(p: Path):
    data = bytearray(idx_bytes(np.zeros((3, 4), np.uint8)))
    data[0] = 0x12
    p.write_bytes(gzip.compress(bytes(data)))


def _wrong_dtype(p: Path):
    data = bytearray(idx_bytes(np.zeros((3, 4), np.uint8)))
    data[2] = 0x0D  # float
    p.write_bytes(gzip.compress(bytes(data)))


def _short(p: Path):
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4), np.uint8))[:-1]))


def _long(p: Path):
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4), np.uint8)) + b"\x00"))


def _short_raw(p: Path):
    p.write_bytes(idx_bytes(np.zeros((3, 4), np.uint8))[:-5])


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("trunc.gz", _truncated_gz, "truncated"),
        ("crc.gz", _bad_crc, "corrupt"),
        ("stream.gz", _corrupt_stream, "corrupt"),
        ("magic.gz", _wrong_magic, "magic"),
        ("dtype.gz", _wrong_dtype, "0x0d"),
        ("short.gz", _short, "too short"),
        ("long.gz", _long, "too long"),
        ("short_raw", _short_raw, "too short"),
    ],
)
def test_idx_bad_files_raise_naming_the_file(tmp_path, name, make, words):
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError) as e:
        read_idx(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg


# --- CIFAR --------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, None, 5])
def test_cifar10_batch_round_trip(tmp_path, protocol):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 6)]
    x, y = read_cifar_batch(write_cifar(tmp_path / "data_batch_1", data, labels, protocol=protocol))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (6, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels
    # layout: the first 1024 values are the red plane, row-major
    assert np.array_equal(x[:, 0].reshape(6, -1).numpy(), data[:, :1024])
    assert np.array_equal(x[3, 2, 5].numpy(), data[3, 2048 + 5 * 32 : 2048 + 6 * 32])


@pytest.mark.parametrize("protocol", [2, None])
def test_cifar100_batch_uses_fine_labels(tmp_path, protocol):
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    fine = np.array([0, 99, 42, 7], dtype=np.int64)
    path = tmp_path / "train"
    with open(path, "wb") as f:
        obj = {b"data": data, b"fine_labels": list(map(int, fine)), b"coarse_labels": [0, 19, 3, 2]}
        pickle.dump(obj, f, protocol=protocol)
    x, y = read_cifar_batch(path)
    assert y.tolist() == fine.tolist()
    assert np.array_equal(x.reshape(4, -1).numpy(), data)


class _Evil:
    """Pickles as a call to os.mkdir(marker): runs only if the unpickler resolves `posix.mkdir`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cifar_pickle_with_foreign_global_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write_cifar(tmp_path / "data_batch_1", _Evil(marker), [0])
    # The payload is live: a plain unpickler would run it (shown on a second marker).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Evil(live)))
    assert live.is_dir()
    with pytest.raises(DataError, match="not allowed") as e:
        read_cifar_batch(path)
    assert str(path) in str(e.value) and "mkdir" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, labels, words",
    [
        (np.zeros((3, 3000), np.uint8), [0, 1, 2], "expected (N, 3072)"),
        (np.zeros((3, 3072), np.uint8), [0, 1], "2 labels for 3 images"),
        (np.zeros((3, 3072), np.uint8), [0, 1, 10], "outside [0, 10)"),
        (np.zeros((3, 3072), np.float32), [0, 1, 2], "uint8"),
        (np.zeros((3, 3072), np.uint8), [[0], [1], [2]], "flat list"),
    ],
)
def test_cifar_bad_shapes_raise(tmp_path, data, labels, words):
    path = write_cifar(tmp_path / "bad", data, labels)
    with pytest.raises(DataError) as e:
        read_cifar_batch(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_cifar_truncated_pickle_raises(tmp_path):
    path = write_cifar(tmp_path / "b", np.zeros((3, 3072), np.uint8), [0, 1, 2])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=str(path)):
        read_cifar_batch(path)


# --- the real Fashion-MNIST ---------------------------------------------------------------------
@needs_fmnist
def test_real_fashion_mnist_from_debian_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FMNIST_DIR", Path("/usr/share/datasets/fashion-mnist"))
    assert resolve("fmnist", None, tmp_path, download=False) == sources.DEBIAN_FMNIST_DIR
    tx, ty, sx, sy = load_arrays("fmnist", None, tmp_path, download=False)
    assert tuple(tx.shape) == (60000, 1, 28, 28) and tuple(sx.shape) == (10000, 1, 28, 28)
    assert tx.dtype == sx.dtype == torch.uint8 and ty.dtype == sy.dtype == torch.int64
    assert torch.bincount(ty, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(sy, minlength=10).tolist() == [1000] * 10
    assert 0.28 < tx.float().mean().item() / 255 < 0.29  # matches the spec's normalization mean


# --- sources ------------------------------------------------------------------------------------
@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Point the Debian directory at an empty folder (the test machine may have the package)."""
    d = tmp_path / "debian-empty"
    d.mkdir()
    monkeypatch.setattr(sources, "DEBIAN_FMNIST_DIR", d)
    return d


def test_source_order_root_then_cache_then_debian(tmp_path, monkeypatch):
    root, cache, debian = tmp_path / "root", tmp_path / "cache", tmp_path / "debian"
    write_idx_dataset(root / "fmnist", 11, 3)  # the `<root>/<name>/` layout
    write_idx_dataset(cache / "fmnist", 12, 3)
    write_idx_dataset(debian, 13, 3)
    monkeypatch.setattr(sources, "DEBIAN_FMNIST_DIR", debian)
    (root / IDX_FILES[0]).write_bytes(b"")  # an incomplete set directly in root is skipped

    def n_train(r):
        return len(load_arrays("fmnist", r, cache, download=False)[0])

    assert resolve("fmnist", root, cache, download=False) == root / "fmnist"
    assert n_train(root) == 11
    assert n_train(None) == 12
    write_idx_dataset(root, 10, 3)  # a full set directly in root comes first
    assert n_train(root) == 10
    (cache / "fmnist" / IDX_FILES[2]).unlink()
    assert n_train(None) == 13
    # only Fashion-MNIST looks in the Debian directory
    with pytest.raises(DataError):
        resolve("mnist", None, cache, download=False)


def _patch_spec(monkeypatch, name: str, **changes):
    monkeypatch.setitem(sources.SPECS, name, dataclasses.replace(sources.SPECS[name], **changes))


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server for `tmp_path / 'www'`; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("via", ["file", "http"])
def test_download_idx_verifies_and_lands_in_cache(tmp_path, monkeypatch, no_debian, http_server, via):
    mirror = tmp_path / "www"
    arrays = write_idx_dataset(mirror, 20, 10, seed=3)
    base = mirror.as_uri() + "/" if via == "file" else http_server
    _patch_spec(monkeypatch, "mnist", base_url=base, archives=tuple((f, md5(mirror / f)) for f in IDX_FILES))
    cache = tmp_path / "cache"
    assert resolve("mnist", None, cache, download=True) == cache / "mnist"
    assert sorted(p.name for p in files_under(cache)) == sorted(IDX_FILES)  # no temp files left
    for f in IDX_FILES:
        (mirror / f).unlink()  # the second load must not need the network
    tx, ty, sx, sy = load_arrays("mnist", None, cache, download=True)
    assert np.array_equal(tx[:, 0].numpy(), arrays["train_x"]) and np.array_equal(
        sy.numpy(), arrays["test_y"]
    )


def test_download_with_wrong_md5_raises_and_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_idx_dataset(mirror, 5, 5)
    bad = "0" * 32
    _patch_spec(
        monkeypatch, "mnist", base_url=mirror.as_uri() + "/", archives=tuple((f, bad) for f in IDX_FILES)
    )
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        resolve("mnist", None, cache, download=True)
    msg = str(e.value)
    url = mirror.as_uri() + "/" + IDX_FILES[0]
    assert url in msg and bad in msg and md5(mirror / IDX_FILES[0]) in msg
    assert files_under(cache) == []


def test_offline_with_nothing_present_lists_expected_files(tmp_path, monkeypatch, no_debian):
    _patch_spec(monkeypatch, "fmnist", base_url=(tmp_path / "unreachable").as_uri() + "/")
    for download in (True, False):
        with pytest.raises(DataError) as e:
            resolve("fmnist", None, tmp_path / "cache", download=download)
        msg = str(e.value)
        assert all(f in msg for f in IDX_FILES)
        assert str(tmp_path / "cache" / "fmnist") in msg and str(no_debian) in msg
        assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg
        assert ("failed" in msg) == download
    assert files_under(tmp_path / "cache") == []


def _cifar_tarball(path: Path, subdir: str, extra: tarfile.TarInfo | None = None) -> dict:
    rng = np.random.default_rng(5)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, 4)]
            buf = io.BytesIO()
            pickle.dump({b"data": data, b"labels": labels}, buf, protocol=2)
            info = tarfile.TarInfo(f"{subdir}/{name}")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            batches[name] = (data, labels)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size))
    return batches


def test_download_cifar_tarball_extracts(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    tgz = mirror / "cifar-10-python.tar.gz"
    batches = _cifar_tarball(tgz, "cifar-10-batches-py")
    _patch_spec(monkeypatch, "cifar10", base_url=mirror.as_uri() + "/", archives=((tgz.name, md5(tgz)),))
    cache = tmp_path / "cache"
    tx, ty, sx, sy = load_arrays("cifar10", None, cache, download=True)
    assert tuple(tx.shape) == (20, 3, 32, 32) and tuple(sx.shape) == (4, 3, 32, 32)
    assert np.array_equal(tx[4:8].reshape(4, -1).numpy(), batches["data_batch_2"][0])
    assert sy.tolist() == batches["test_batch"][1]
    assert (cache / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()


def test_unsafe_tar_member_is_refused(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    tgz = mirror / "cifar-10-python.tar.gz"
    evil = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
    evil.size = 1
    _cifar_tarball(tgz, "cifar-10-batches-py", extra=evil)
    _patch_spec(monkeypatch, "cifar10", base_url=mirror.as_uri() + "/", archives=((tgz.name, md5(tgz)),))
    with pytest.raises(DataError, match="unsafe path"):
        resolve("cifar10", None, tmp_path / "cache", download=True)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cache" / "escaped").exists()
    assert not (tmp_path / "cache" / "cifar10" / "cifar-10-batches-py").exists()


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError, match="fmnist, mnist, cifar10, cifar100"):
        get_spec("svhn")


# --- augmentation -------------------------------------------------------------------------------
def _distinct_images(b=6, c=2, h=5, w=7) -> torch.Tensor:
    """Every pixel value distinct and nonzero, so a crop window identifies its offset uniquely."""
    return (torch.arange(b * c * h * w, dtype=torch.float32) + 1).reshape(b, c, h, w)


def _reference_offset(out: torch.Tensor, x: torch.Tensor, p: int) -> tuple[int, int]:
    """The (top, left) window of the zero-padded sample `x` equal to `out`, by exhaustive search."""
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    h, w = x.shape[-2:]
    hits = [
        (t, l)
        for t in range(2 * p + 1)
        for l in range(2 * p + 1)
        if torch.equal(padded[:, t : t + h, l : l + w], out)
    ]
    assert len(hits) == 1, "output is not a window of the padded input"
    return hits[0]


def test_crop_at_matches_per_sample_reference():
    x = _distinct_images()
    top, left = torch.tensor([0, 1, 2, 3, 4, 2]), torch.tensor([4, 3, 2, 1, 0, 0])
    out = crop_at(x, 2, top, left)
    for i in range(len(x)):
        ref = torch.nn.functional.pad(x[i], (2, 2, 2, 2))[:, top[i] : top[i] + 5, left[i] : left[i] + 7]
        assert torch.equal(out[i], ref)


def test_random_crop_is_shifted_window_and_covers_all_offsets():
    p = 2
    x = _distinct_images(b=8)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        out = random_crop(x, p, generator=g)
        assert out.shape == x.shape
        for i in range(len(x)):
            seen.add(_reference_offset(out[i], x[i], p))
    assert seen == {(t, l) for t in range(2 * p + 1) for l in range(2 * p + 1)}
    same = (
        random_crop(x, p, torch.Generator().manual_seed(7)),
        random_crop(x, p, torch.Generator().manual_seed(7)),
    )
    assert torch.equal(*same)
    assert random_crop(x, 0) is x


def test_random_hflip_flips_exactly_the_chosen_samples():
    x = _distinct_images(b=64)
    out = random_hflip(x, torch.Generator().manual_seed(3))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert torch.all(flipped ^ kept)  # each sample is either mirrored or untouched
    assert 10 < flipped.sum() < 54
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, random_hflip(x, torch.Generator().manual_seed(4)))
    mask = torch.tensor([True, False] * 32)
    chosen = hflip_where(x, mask)
    assert torch.equal(chosen[mask], x[mask].flip(-1)) and torch.equal(chosen[~mask], x[~mask])


def test_to_unit():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    y = to_unit(x)
    assert y.dtype == torch.float32 and torch.allclose(y, torch.tensor([0, 1, 128, 255]) / 255.0)
    assert x.tolist() == [0, 1, 128, 255]  # the input is not modified in place


# --- datamodule ---------------------------------------------------------------------------------
N_TRAIN, N_TEST = 300, 101


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_idx_dataset(root, N_TRAIN, N_TEST, seed=9)
    return root


def make_dm(root: Path, tmp: Path, seed: int = 0, **data) -> ImageDataModule:
    cfg = dict(name="fmnist", root=str(root), download=False, val_size=50, batch_size=32, eval_batch_size=20)
    cfg.update(data)
    dm = ImageDataModule(DataConfig(**cfg), PathsConfig(data=str(tmp / "cache")), seed=seed)
    dm.setup("fit")
    return dm


def fake_trainer(rank=0, world=1, training=False, epoch=0, distributed_sampler=False):
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        training=training,
        current_epoch=epoch,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=distributed_sampler),
    )


def test_split_is_seeded_disjoint_and_covering(tiny_root, tmp_path):
    a, b = make_dm(tiny_root, tmp_path), make_dm(tiny_root, tmp_path)
    c = make_dm(tiny_root, tmp_path, split_seed=1)
    assert torch.equal(a.val_indices, b.val_indices) and torch.equal(a.train_indices, b.train_indices)
    assert not torch.equal(a.val_indices, c.val_indices)
    assert len(a.val_indices) == 50 and len(a.train_indices) == N_TRAIN - 50
    union = torch.cat([a.train_indices, a.val_indices]).sort().values
    assert torch.equal(union, torch.arange(N_TRAIN))
    sub = make_dm(tiny_root, tmp_path, train_subset=17)
    assert torch.equal(sub.train_indices, a.train_indices[:17]) and torch.equal(
        sub.val_indices, a.val_indices
    )
    assert sub.spec.num_classes == sub.num_classes == 10
    with pytest.raises(DataError, match="val_size"):
        make_dm(tiny_root, tmp_path, val_size=N_TRAIN)


def test_batches_after_transfer(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path, crop_padding=2, hflip=True)
    x8, y, idx = next(iter(dm.train_dataloader()))
    assert x8.dtype == torch.uint8 and y.dtype == idx.dtype == torch.int64 and len(idx) == 32
    assert torch.equal(x8, dm.train_x[idx]) and torch.equal(y, dm.train_y[idx])
    assert set(idx.tolist()) <= set(dm.train_indices.tolist())

    dm.trainer = fake_trainer(training=False)
    x, y2, idx2 = dm.on_after_batch_transfer((x8, y, idx), 0)
    assert x.dtype == torch.float32 and torch.equal(x, x8.float() / 255) and torch.equal(idx2, idx)
    dm.trainer = fake_trainer(training=True)
    torch.manual_seed(0)
    xa, _, _ = dm.on_after_batch_transfer((x8, y, idx), 0)
    assert xa.shape == x.shape and xa.dtype == torch.float32
    assert 0 <= xa.min() and xa.max() <= 1
    assert not torch.equal(xa, x)  # augmented while training
    plain = make_dm(tiny_root, tmp_path)  # crop 0, no flip: training batches are not changed
    plain.trainer = fake_trainer(training=True)
    assert torch.equal(plain.on_after_batch_transfer((x8, y, idx), 0)[0], x)


@pytest.mark.parametrize("split, n", [("test", 101), ("test", 57), ("val", None)])
def test_eval_sharding_covers_each_index_once_with_fixed_batches(tiny_root, tmp_path, split, n):
    dm = make_dm(tiny_root, tmp_path)
    single = [b[2].tolist() for b in dm.eval_loader(split, n=n, batch_size=20)]
    expected = (torch.arange(N_TEST) if split == "test" else dm.val_indices)[: n or None].tolist()
    assert sum(single, []) == expected
    for world in (2, 3):
        batches = []
        for rank in range(world):
            dm.trainer = fake_trainer(rank, world)  # rank / world are read from the trainer
            loader = dm.eval_loader(split, n=n, batch_size=20)
            mine = [b[2].tolist() for b in loader]
            assert len(loader) == len(mine) and mine == single[rank::world]  # batch b -> rank b % world
            batches += mine
        dm.trainer = None
        assert sorted(batches) == sorted(single)  # identical composition, each index once
        assert sorted(sum(batches, [])) == sorted(expected)


def test_rank_without_eval_batches_gets_one_empty_batch(tiny_root, tmp_path):
    """More ranks than batches: the idle ranks' loaders yield one empty batch (Lightning would skip
    their whole loop, epoch-end collectives included); with no batch at all nothing is padded."""
    dm = make_dm(tiny_root, tmp_path)
    loaders = [dm.eval_loader("test", n=15, batch_size=20, rank=r, world_size=3) for r in range(3)]
    batches = [[b[2].tolist() for b in loader] for loader in loaders]
    assert batches == [[list(range(15))], [[]], [[]]] and [len(lo) for lo in loaders] == [1, 1, 1]
    x, y, idx = next(iter(loaders[1]))
    assert x.shape == (0, 1, 28, 28) and y.shape == idx.shape == (0,) and is_empty_batch((x, y, idx))
    assert not is_empty_batch(next(iter(loaders[0])))
    assert len(dm.eval_loader("test", n=15, batch_size=20)) == 1  # one process: no placeholder
    assert [len(dm.eval_loader("test", n=0, rank=r, world_size=2)) for r in (0, 1)] == [0, 0]
    dm.val_n = 30  # the first 30 validation images, whatever the number of ranks
    assert sum(len(b[2]) for b in dm.val_dataloader()) == 30
    dm.val_n = 10**6  # capped at the split
    assert sum(len(b[2]) for b in dm.val_dataloader()) == len(dm.val_indices)


def test_test_dataloader_uses_attributes(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    assert [len(b[2]) for b in dm.test_dataloader()] == [20] * 5 + [1]
    dm.test_n, dm.test_batch_size = 30, 8
    assert [b[2].tolist() for b in dm.test_dataloader()][-1] == list(range(24, 30))
    assert len(dm.test_dataloader(n=10, batch_size=4)) == 3
    with pytest.raises(DataError):
        dm.eval_loader("test", n=N_TEST + 1)


def test_train_sharding_equal_batches_per_rank(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path, train_subset=230)
    for world in (1, 2, 3):
        per_rank = []
        for rank in range(world):
            loader = dm.train_dataloader(rank=rank, world_size=world)
            per_rank.append([b[2] for b in loader])
            assert len(loader) == len(per_rank[-1])
        counts = {len(r) for r in per_rank}
        assert len(counts) == 1 and counts.pop() == (230 // 32) // world  # 7 batches: not divisible by 2 or 3
        flat = torch.cat([torch.cat(r) for r in per_rank])
        assert len(set(flat.tolist())) == len(flat)  # ranks see disjoint images in one epoch
        assert all(len(b) == 32 for r in per_rank for b in r)
    # the permutation is seeded by (seed, epoch)
    loader = dm.train_dataloader()
    e0 = [b[2] for b in loader]
    assert all(torch.equal(a, b[2]) for a, b in zip(e0, dm.train_dataloader()))
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(e0), torch.cat([b[2] for b in loader]))
    other = make_dm(tiny_root, tmp_path, seed=1, train_subset=230)
    assert not torch.equal(torch.cat(e0), torch.cat([b[2] for b in other.train_dataloader()]))
    # tiny sets still give every rank a batch
    small = make_dm(tiny_root, tmp_path, train_subset=5)
    assert [len(small.train_dataloader(rank=r, world_size=2)) for r in (0, 1)] == [1, 1]


def test_refuses_lightning_distributed_sampler(tiny_root, tmp_path):
    dm = make_dm(tiny_root, tmp_path)
    dm.trainer = fake_trainer(0, 2, distributed_sampler=True)
    with pytest.raises(RuntimeError, match="use_distributed_sampler=False"):
        dm.train_dataloader()


def test_with_lightning_trainer(tiny_root, tmp_path):
    """The hooks as Lightning calls them: augmented float batches in training, plain ones in validation."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_batches, self.val_batches = [], []

        def training_step(self, batch, i):
            self.train_batches.append((self.current_epoch, batch))
            return (self.w * batch[0].mean()).sum()

        def validation_step(self, batch, i):
            self.val_batches.append(batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageDataModule(
        DataConfig(
            name="fmnist", root=str(tiny_root), download=False, val_size=40, batch_size=50, crop_padding=3
        ),
        PathsConfig(data=str(tmp_path / "cache")),
    )
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert len(model.train_batches) == 2 * ((N_TRAIN - 40) // 50)
    for _, (x, _, _) in model.train_batches:
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    augmented = [not torch.equal(x, dm.train_x[idx].float() / 255) for _, (x, _, idx) in model.train_batches]
    assert all(augmented)
    for x, _, idx in model.val_batches:
        assert torch.equal(x, dm.train_x[idx].float() / 255)
    assert sorted(torch.cat([b[2] for b in model.val_batches]).tolist()) == sorted(
        dm.val_indices.tolist() * 2
    )
    epochs = [torch.cat([b[2] for e, b in model.train_batches if e == k]) for k in (0, 1)]
    assert not torch.equal(epochs[0], epochs[1])  # Lightning advanced the sampler's epoch


# --- dataset files as people have them (data.root) ------------------------------------------------
RAW_IDX = tuple(f.removesuffix(".gz") for f in IDX_FILES)  # as many mirrors ship them
DOTTED_IDX = tuple(f.replace("-idx", ".idx") for f in RAW_IDX)  # train-images.idx3-ubyte


@pytest.fixture
def other_copies(tmp_path, monkeypatch):
    """A complete copy in the cache and in the Debian directory, and a reachable mirror: none of
    them may stand in for a data.root that lacks the dataset."""
    cache, debian, mirror = tmp_path / "cache", tmp_path / "debian", tmp_path / "mirror"
    for name in ("fmnist", "mnist"):
        write_idx_dataset(cache / name, 31, 3)
        mirror_files = tuple((f, md5(p)) for f, p in ((f, cache / name / f) for f in IDX_FILES))
        _patch_spec(monkeypatch, name, base_url=(cache / name).as_uri() + "/", archives=mirror_files)
    write_idx_dataset(debian, 32, 3)
    monkeypatch.setattr(sources, "DEBIAN_FMNIST_DIR", debian)
    mirror.mkdir()
    return cache


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
@pytest.mark.parametrize(
    "layout, names",
    [
        ("", RAW_IDX),
        ("", DOTTED_IDX),
        ("", (RAW_IDX[0], IDX_FILES[1], DOTTED_IDX[2], IDX_FILES[3])),  # mixed
        ("{name}", RAW_IDX),
        ("{tv}/raw", RAW_IDX),  # torchvision's layout
        ("{tv}/raw", IDX_FILES),
    ],
)
def test_root_with_idx_files_compressed_or_not_is_used(tmp_path, other_copies, name, layout, names):
    root = tmp_path / "root"
    tv = {"mnist": "MNIST", "fmnist": "FashionMNIST"}[name]
    d = root / layout.format(name=name, tv=tv)
    arrays = write_idx_dataset(d, 17, 5, seed=4, names=names)
    assert resolve(name, root, other_copies, download=True) == d
    tx, ty, sx, sy = load_arrays(name, root, other_copies, download=True)
    assert len(tx) == 17  # not the cache's 31 nor the Debian copy's 32 images
    assert np.array_equal(tx[:, 0].numpy(), arrays["train_x"]) and np.array_equal(
        sy.numpy(), arrays["test_y"]
    )


def test_gzip_is_told_by_content_not_name(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw_named_gz, gz_named_raw = tmp_path / "a.gz", tmp_path / "b"
    raw_named_gz.write_bytes(idx_bytes(images))  # a browser decompressed it and kept the name
    gz_named_raw.write_bytes(gzip.compress(idx_bytes(images)))
    for p in (raw_named_gz, gz_named_raw):
        assert np.array_equal(read_idx(p).numpy(), images)


@pytest.mark.parametrize("name", ["mnist", "fmnist"])
def test_root_without_the_dataset_is_an_error_never_replaced(tmp_path, other_copies, name):
    root = tmp_path / "root"
    root.mkdir()
    (root / "README").write_text("not a dataset")
    with pytest.raises(DataError) as e:
        resolve(name, root, other_copies, download=True)
    msg = str(e.value)
    assert f"data.root={root} does not hold the {name} dataset" in msg and "\n" not in msg
    assert all(f in msg for f in IDX_FILES) and "uncompressed" in msg
    with pytest.raises(DataError, match="does not hold"):
        load_arrays(name, root, other_copies, download=True)
    # three of the four files: the message names the one that is missing, and where
    write_idx_dataset(root, 5, 2, names=RAW_IDX)
    (root / RAW_IDX[3]).unlink()
    with pytest.raises(DataError) as e:
        resolve(name, root, other_copies, download=True)
    msg = str(e.value)
    assert f"{root} lacks {IDX_FILES[3]}" in msg and IDX_FILES[0] not in msg
    with pytest.raises(DataError, match="no such directory"):
        resolve(name, tmp_path / "typo", other_copies, download=True)
    # without data.root the cache copy is used as before
    assert len(load_arrays(name, None, other_copies, download=False)[0]) == 31
    assert sorted(p.name for p in files_under(other_copies / name)) == sorted(IDX_FILES)  # nothing fetched


def _cifar_files(d: Path, seed: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = (
            rng.integers(0, 256, (3, 3072), dtype=np.uint8),
            [int(v) for v in rng.integers(0, 10, 3)],
        )
        write_cifar(d / name, data, labels)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "", "cifar10", "cifar10/cifar-10-batches-py"])
def test_cifar_root_extracted_dir_or_files_directly(tmp_path, layout):
    root, cache = tmp_path / "root", tmp_path / "cache"
    batches = _cifar_files(root / layout)
    _cifar_files(cache / "cifar10" / "cifar-10-batches-py", seed=7)  # another copy: not used
    assert resolve("cifar10", root, cache, download=False) == root / layout
    tx, _, sx, sy = load_arrays("cifar10", root, cache, download=False)
    assert np.array_equal(tx[:3].reshape(3, -1).numpy(), batches["data_batch_1"][0])
    assert sy.tolist() == batches["test_batch"][1]


def test_cifar_tarball_in_root_is_checked_and_extracted_into_the_cache(tmp_path, monkeypatch):
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    tgz = root / "cifar-10-python.tar.gz"
    batches = _cifar_tarball(tgz, "cifar-10-batches-py")
    _patch_spec(monkeypatch, "cifar10", archives=((tgz.name, "0" * 32),))
    with pytest.raises(DataError, match=f"{tgz} has md5 {md5(tgz)}, not the published 0{{32}}"):
        resolve("cifar10", root, cache, download=False)
    assert not (cache / "cifar10" / "cifar-10-batches-py").exists()
    _patch_spec(monkeypatch, "cifar10", archives=((tgz.name, md5(tgz)),))
    before = sorted(p.name for p in root.iterdir())
    assert resolve("cifar10", root, cache, download=False) == cache / "cifar10" / "cifar-10-batches-py"
    tx, _, _, sy = load_arrays("cifar10", root, cache, download=False)
    assert np.array_equal(tx[4:8].reshape(4, -1).numpy(), batches["data_batch_2"][0])
    assert sy.tolist() == batches["test_batch"][1]
    assert sorted(p.name for p in root.iterdir()) == before  # the user's data.root is not written


def test_cifar_root_without_the_dataset_names_the_archive(tmp_path):
    root = tmp_path / "root"
    _cifar_files(root / "cifar-10-batches-py")
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        resolve("cifar10", root, tmp_path / "cache", download=True)
    msg = str(e.value)
    assert f"{root / 'cifar-10-batches-py'} lacks test_batch" in msg
    assert "cifar-10-python.tar.gz" in msg and "\n" not in msg
