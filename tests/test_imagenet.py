"""The ILSVRC2012 validation reader: devkit labels mapped to the sorted-WNID (PyTorch) convention,
torchvision's Resize(256) + CenterCrop(224), lazy decoding of the first images only, and one-line
errors naming the missing parts and where they come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from advpure.config.schema import DataConfig
from advpure.core.errors import DataError
from advpure.data import ImageDataModule, class_names, get_spec, resolve, unavailable
from advpure.data import imagenet as I
from helpers.imagenet_fake import KIT_FOX, SEA_SNAKE, TENCH, TENCH_ID, fake_wnids, write_devkit, write_images

GT = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"


def _datamodule(root, cache, test_n=None):
    cfg = OmegaConf.structured(DataConfig(name="imagenet", root=None if root is None else str(root)))
    dm = ImageDataModule(cfg, OmegaConf.create({"data": str(cache)}))
    dm.test_n = test_n
    return dm


@pytest.fixture()
def val(tmp_path):
    """data.root with 4 images in val/ (landscape, portrait, grey, short side already 256) and the devkit."""
    ids = write_devkit(tmp_path, [490, 1, TENCH_ID, 3])
    write_images(tmp_path / "val", [(500, 375), (300, 400), (256, 300), (256, 256)])
    grey = tmp_path / "val" / I.val_file_name(2)
    Image.open(grey).convert("L").save(grey, format="JPEG")
    return tmp_path, ids


def test_devkit_labels_become_sorted_wnid_indices(val):
    root, ids = val
    x, y, names = I.load_val(root, root / "cache")
    assert len(x) == 50_000 and y.shape == (50_000,) and y.dtype == torch.long
    # ID 490 (sea snake), ID 1 (kit fox), tench: indices 1, 2, 0 once WNIDs are sorted
    assert y[:3].tolist() == [1, 2, 0]
    assert names[:3] == (f"class {TENCH}", f"class {SEA_SNAKE}", f"class {KIT_FOX}")
    ranked = sorted(fake_wnids())
    wnids = fake_wnids()
    expected = [ranked.index(wnids[i - 1]) for i in ids[:2000]]
    assert y[:2000].tolist() == expected
    assert x.decoded == 0  # nothing decoded yet


def test_resize_256_center_crop_224_like_torchvision(val):
    root, _ = val
    x, _, _ = I.load_val(root, None)
    batch = x[torch.tensor([0, 1, 2, 3])]
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.uint8 and x.decoded == 4
    # hand-computed: 500x375 -> short side 256, long int(256 * 500 / 375) = 341; crop offsets
    # round((341 - 224) / 2) = 58 (Python rounds half to even), round((256 - 224) / 2) = 16
    cases = {0: ((341, 256), (58, 16)), 1: ((256, 341), (16, 58)), 3: ((256, 256), (16, 16))}
    for i, (size, (left, top)) in cases.items():
        img = Image.open(root / "val" / I.val_file_name(i)).convert("RGB")
        want = np.asarray(img.resize(size, Image.BILINEAR).crop((left, top, left + 224, top + 224)))
        assert torch.equal(batch[i], torch.from_numpy(want.copy()).permute(2, 0, 1)), i
    # Pillow's bilinear filter is antialiased: torch's antialiased bilinear agrees to rounding
    img = torch.from_numpy(np.asarray(Image.open(root / "val" / I.val_file_name(0)).convert("RGB")).copy())
    ref = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(256, 341), mode="bilinear", antialias=True)
    ref = ref[0, :, 16:240, 58:282].round().clamp(0, 255)
    assert (ref - batch[0].float()).abs().max() <= 1
    plain = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(256, 341), mode="bilinear")
    assert (plain[0, :, 16:240, 58:282].round() - batch[0].float()).abs().max() > 1  # not the plain one
    # a grey JPEG becomes three equal channels (convert("RGB"), as torchvision's loader)
    assert torch.equal(batch[2][0], batch[2][1]) and torch.equal(batch[2][1], batch[2][2])
    assert torch.equal(x[1], batch[1]) and torch.equal(x[1:3], batch[1:3])


def test_datamodule_decodes_only_the_first_n_images(val):
    root, _ = val
    dm = _datamodule(root, root / "cache", test_n=3)
    dm.prepare_data()
    dm.setup("test")
    assert dm.test_x.decoded == 3 and len(dm.train_indices) == 0
    xb, yb, idx = next(iter(dm.test_dataloader(batch_size=2)))
    assert xb.shape == (2, 3, 224, 224) and yb.tolist() == [1, 2] and idx.tolist() == [0, 1]
    assert [b[2].tolist() for b in dm.test_dataloader(batch_size=2)] == [[0, 1], [2]]
    with pytest.raises(DataError, match=r"ILSVRC2012_val_00000005\.JPEG: validation image not found"):
        dm.test_x[4]
    with pytest.raises(DataError, match="does not train on it"):
        _datamodule(root, root / "cache").setup("fit")


def test_spec_and_class_names(val, tmp_path):
    spec = get_spec("imagenet")
    assert (spec.shape, spec.num_classes, spec.test_size) == ((3, 224, 224), 1000, 50_000)
    root, _ = val
    assert class_names("imagenet", root, None)[0] == f"class {TENCH}"
    assert class_names("imagenet", tmp_path / "none", None) == spec.class_names  # no devkit: indices
    assert resolve("imagenet", root, None) == root / "val"


@pytest.mark.parametrize("lack", ["images", "devkit", "both"])
def test_missing_parts_are_one_line_naming_both_sources(tmp_path, lack):
    root = tmp_path / "in"
    if lack == "images":
        write_devkit(root, [1])
    if lack == "devkit":
        write_images(root / "ILSVRC2012_img_val", [(300, 300)])
    msg = unavailable("imagenet", root, tmp_path / "cache")
    with pytest.raises(DataError) as e:
        _datamodule(root, tmp_path / "cache").prepare_data()
    assert str(e.value) == msg and "\n" not in msg
    assert "image-net.org" in msg and "login" in msg and "data.root" in msg
    assert str(root) in msg and "cache" not in msg  # data.root set: the only place looked at
    assert ("ILSVRC2012_img_val.tar" in msg) == (lack != "devkit")
    assert ("ILSVRC2012_devkit_t12.tar.gz" in msg and GT in msg) == (lack != "images")


def test_cache_is_used_when_root_is_unset_and_complete_sets_pass(val, tmp_path):
    root, _ = val
    assert unavailable("imagenet", root, None) is None and unavailable("cifar10", None, tmp_path) is None
    cache = tmp_path / "cache"
    msg = unavailable("imagenet", None, cache)
    assert str(cache / "imagenet") in msg and "or set data.root" in msg
    write_devkit(cache / "imagenet", [1])
    write_images(cache / "imagenet", [(300, 300)])  # the JPEGs directly in the folder
    assert unavailable("imagenet", None, cache) is None


def test_bad_files_are_one_line_errors(val):
    root, _ = val
    data = root / "ILSVRC2012_devkit_t12" / "data"
    (root / "val" / I.val_file_name(1)).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"ILSVRC2012_val_00000002\.JPEG: cannot decode"):
        I.load_val(root, None)[0][1]
    lines = (data / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(lines[:-1]))
    with pytest.raises(DataError, match="49999 labels, expected 50000"):
        I.load_val(root, None)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(["1001", *lines[1:]]))
    with pytest.raises(DataError, match=r"outside 1\.\.1000"):
        I.load_val(root, None)
    from helpers.imagenet_fake import write_meta

    write_meta(data / "meta.mat", fake_wnids(), leaves=999)
    with pytest.raises(DataError, match=r"999 ILSVRC2012_IDs, expected exactly 1\.\.1000"):
        I.read_meta(data / "meta.mat")
    (data / "meta.mat").write_bytes(b"MATLAB 5.0 truncated")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        I.read_meta(data / "meta.mat")
