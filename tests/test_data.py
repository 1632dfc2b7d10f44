"""Tests of numgan.data (spec FIGURES.md Sec. 1.4): sampler, TF-1 resize, crops, loaders, cache."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import numgan.paths
from numgan import data as D

SHARED = Path(numgan.paths.ROOT).parent / "shared" / "data"


def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"offline data {path} not present (needs the shared/ folder beside the repo)")
    return path


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):
    """Keep caches and default roots inside tmp_path."""
    monkeypatch.setenv("NUMGAN_DATA", str(tmp_path / "data_root"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in members.items():
            zf.writestr(name, _png(arr))
    return path


def _resize_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent reference: TF-1 legacy bilinear (src = dst * in / out), float64, loops."""
    in_h, in_w = img.shape[-2:]
    res = np.zeros(img.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        sy = i * in_h / out_h
        a = int(np.floor(sy))
        b, fy = min(a + 1, in_h - 1), sy - a
        for j in range(out_w):
            sx = j * in_w / out_w
            c = int(np.floor(sx))
            d, fx = min(c + 1, in_w - 1), sx - c
            top = img[..., a, c] * (1 - fx) + img[..., a, d] * fx
            bot = img[..., b, c] * (1 - fx) + img[..., b, d] * fx
            res[..., i, j] = top * (1 - fy) + bot * fy
    return res


# ---------------------------------------------------------------------------------------------
# ImageSampler
# ---------------------------------------------------------------------------------------------

def _numbered(n: int) -> torch.Tensor:
    """Images whose pixel values all equal their index (n <= 256)."""
    return torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous()


def _ids(batch: torch.Tensor) -> list[int]:
    return torch.round((batch[:, 0, 0, 0] + 1) / 2 * 255).long().tolist()


def test_sampler_range_dtype_shape():
    imgs = torch.tensor([0, 255], dtype=torch.uint8)[:, None, None, None].expand(2, 3, 5, 6)
    s = D.ImageSampler(imgs, batch_size=4, seed=1)
    b = s()
    assert b.dtype == torch.float32 and b.shape == (4, 3, 5, 6)
    assert b.min().item() == -1.0 and b.max().item() == 1.0
    mid = D.ImageSampler(torch.full((1, 3, 2, 2), 51, dtype=torch.uint8), 1).next()
    assert torch.allclose(mid, torch.tensor(51 / 255 * 2 - 1))


def test_sampler_every_image_once_per_epoch():
    n = 10
    for bs in (5, 3, 4):  # 3, 4: batches straddle epoch boundaries
        s = D.ImageSampler(_numbered(n), batch_size=bs, seed=3)
        drawn = sum((_ids(s.next()) for _ in range(3 * n // bs + 1)), [])
        for epoch in range(3):
            assert sorted(drawn[epoch * n:(epoch + 1) * n]) == list(range(n)), (bs, epoch)
        # epochs are shuffled differently
        assert drawn[:n] != drawn[n:2 * n]


def test_sampler_resume_reproduces_sequence():
    full = D.ImageSampler(_numbered(13), batch_size=5, seed=7)
    expected = [_ids(full.next()) for _ in range(9)]
    part = D.ImageSampler(_numbered(13), batch_size=5, seed=7)
    for _ in range(4):
        part.next()
    state = part.state_dict()
    for _ in range(3):  # advance further: the restore must rewind this
        part.next()
    resumed = D.ImageSampler(_numbered(13), batch_size=5, seed=999)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next()) for _ in range(5)] == expected[4:]


def test_sampler_seeds_differ_and_repeat():
    a = [_ids(D.ImageSampler(_numbered(50), 10, seed=0).next())]
    b = [_ids(D.ImageSampler(_numbered(50), 10, seed=1).next())]
    a2 = [_ids(D.ImageSampler(_numbered(50), 10, seed=0).next())]
    assert a != b and a == a2


def test_sampler_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        D.ImageSampler(torch.zeros(4, 3, 8, 8), batch_size=2)
    s = D.ImageSampler(_numbered(4), 2)
    with pytest.raises(ValueError, match="4 images"):
        D.ImageSampler(_numbered(5), 2).load_state_dict(s.state_dict())


# ---------------------------------------------------------------------------------------------
# TF-1 legacy bilinear resize and crops
# ---------------------------------------------------------------------------------------------

def test_resize_downsample_picks_dst_times_two():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = D.resize_bilinear_tf1(x, 2)
    assert torch.equal(out, x[..., ::2, ::2])  # src = dst * 2 exactly, weights 0


def test_resize_upsample_known_values():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])
    out = D.resize_bilinear_tf1(x, 4)
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30.0]])
    assert torch.equal(out, expected)
    # half-pixel centres (PyTorch's default) give something else: we must not be using them
    torch_default = F.interpolate(x[None, None], size=4, mode="bilinear", align_corners=False)[0, 0]
    assert not torch.allclose(torch_default, expected)


def test_resize_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    for (h, w), (oh, ow) in [((80, 80), (64, 64)), ((7, 5), (3, 4)), ((5, 6), (9, 13)), ((160, 160), (64, 64))]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
        out = D.resize_bilinear_tf1(x, (oh, ow))
        assert out.dtype == torch.float32 and out.shape == (2, 3, oh, ow)
        ref = _resize_numpy(x.double().numpy(), oh, ow)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-3)


def test_celeba_crop_offsets():
    assert D.center_crop_offsets(218, 178, 160) == (29, 9)
    assert D.center_crop_offsets(218, 178, 128) == (45, 25)
    assert D.celeba_crop_box(218, 178, 160) == (29, 9, 160)
    # half-resolution copy 89x109 (WxH): crop scales to 80 (64 for s=128)
    assert D.celeba_crop_box(109, 89, 160) == (14, 4, 80)
    assert D.celeba_crop_box(109, 89, 128) == (22, 12, 64)
    with pytest.raises(ValueError, match="does not fit"):
        D.center_crop_offsets(10, 10, 11)


# ---------------------------------------------------------------------------------------------
# Loaders on files written here
# ---------------------------------------------------------------------------------------------

def _cifar_record(label: int, rgb: np.ndarray) -> bytes:
    """rgb: [32, 32, 3] -> label byte + R plane + G plane + B plane."""
    return bytes([label]) + rgb.transpose(2, 0, 1).tobytes()


def test_cifar_binary_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    for k in range(5):
        (folder / f"data_batch_{k + 1}.bin").write_bytes(
            _cifar_record(3, images[2 * k]) + _cifar_record(7, images[2 * k + 1]))
    assert D.resolve_dataset("cifar10", tmp_path / "cifar10") == ("cifar10-binary", folder)
    x = D.load_images("cifar10", tmp_path / "cifar10")
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    one = D.read_cifar10_binary([folder / "data_batch_1.bin"])
    assert one.shape == (2, 3, 32, 32) and one[1, 2, 5, 6] == images[1, 5, 6, 2]  # B plane, row 5, col 6
    (folder / "data_batch_5.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="3073"):
        D.load_images("cifar10", tmp_path / "cifar10")


def test_missing_dataset_message(tmp_path):
    for name in ("cifar10", "celeba"):
        with pytest.raises(FileNotFoundError) as err:
            D.load_images(name)
        msg = str(err.value)
        assert str(tmp_path / "data_root" / name) in msg and "NUMGAN_DATA" in msg
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz"):
        D.resolve_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_images("mnist")


def test_celeba_split_by_file_number(tmp_path):
    img = np.zeros((218, 178, 3), dtype=np.uint8)
    names = ["000001", "192599", "192600", "202599"]
    z = _write_zip(tmp_path / "celeba.zip", {f"img_align_celeba/{n}.jpg": img + i for i, n in enumerate(names)})
    train = D.load_images("celeba", z, cache=False)
    test = D.load_images("celeba", z, split="test", cache=False)
    every = D.load_images("celeba", z, split="all", cache=False)
    assert train.shape == (2, 3, 64, 64) and test.shape == (2, 3, 64, 64) and every.shape[0] == 4
    assert train[:, 0, 0, 0].tolist() == [0, 1] and test[:, 0, 0, 0].tolist() == [2, 3]


def test_celeba_pipeline_on_written_image(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    (folder / "000001.png").write_bytes(_png(img))
    for crop in (160, 128):
        out = D.load_images("celeba", tmp_path / "celeba", crop=crop, cache=False)
        top, left = D.center_crop_offsets(218, 178, crop)
        patch = img[top:top + crop, left:left + crop].transpose(2, 0, 1).astype(np.float64)
        ref = np.clip(np.round(_resize_numpy(patch, 64, 64)), 0, 255)
        assert out.shape == (1, 3, 64, 64)
        assert np.abs(out[0].numpy().astype(int) - ref).max() <= 1


def test_folder_mixed_sizes_and_image_size(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    z = _write_zip(tmp_path / "imgs.zip", {"x/a.png": a, "y/deep/b.png": b})
    same = _write_zip(tmp_path / "same.zip", {"a.png": a, "b.png": a[::-1].copy()})
    x = D.load_images(f"folder:{same}", cache=False)
    assert torch.equal(x[0], torch.from_numpy(a).permute(2, 0, 1))  # same sizes: untouched
    mixed = D.load_images(str(z), cache=False)  # sizes differ: square crop + resize to 10
    assert mixed.shape == (2, 3, 10, 10)
    assert torch.equal(mixed[0], torch.from_numpy(a[1:11]).permute(2, 0, 1))
    sized = D.load_images(str(z), image_size=8, cache=False)
    assert sized.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="split"):
        D.load_images(str(z), split="test")


def test_synthetic_deterministic():
    a = D.load_images("synthetic")
    assert a.dtype == torch.uint8 and a.shape == (512, 3, 32, 32)
    assert torch.equal(a, D.load_images("synthetic"))
    b = D.load_images("synthetic", seed=1, limit=16, image_size=64)
    assert b.shape == (16, 3, 64, 64) and not torch.equal(b[:, :, ::2, ::2], a[:16])
    assert a.float().std() > 30  # not blank


def test_npy_cache_skips_decoding(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    z = _write_zip(tmp_path / "cache_me.zip",
                   {f"{i}.png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(5)})
    first = D.load_images(str(z), image_size=8)
    cached = list((tmp_path / "data_root" / "cache").glob("*.npy"))
    assert len(cached) == 1 and not list(cached[0].parent.glob("*.tmp"))

    def no_decode(_):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(D, "_decode_image", no_decode)
    assert torch.equal(D.load_images(str(z), image_size=8), first)
    with pytest.raises(AssertionError, match="decoded again"):  # other parameters: new decode
        D.load_images(str(z), image_size=4)


# ---------------------------------------------------------------------------------------------
# The offline copies in shared/data
# ---------------------------------------------------------------------------------------------

def test_shared_cifar_npz():
    folder = _shared("cifar10")
    # the complete 50,000-image zip is preferred over the npz, which holds a subset
    assert D.resolve_dataset("cifar10", folder) == ("zip", folder / "cifar10-jpeg-train.zip")
    npz = folder / "cifar10-exact-subset.npz"
    x = D.load_images("cifar10", npz)
    assert x.dtype == torch.uint8 and x.shape == (5170, 3, 32, 32)
    with np.load(folder / "cifar10-exact-subset.npz") as z:
        assert torch.equal(x[7], torch.from_numpy(z["x_train"][7]).permute(2, 0, 1))
    assert D.load_images("cifar10", npz, split="test").shape == (1017, 3, 32, 32)


def test_shared_cifar_jpeg_zip():
    z = _shared("cifar10/cifar10-jpeg-train.zip")
    x = D.load_images("cifar10", z, limit=300)
    assert x.dtype == torch.uint8 and x.shape == (300, 3, 32, 32)
    assert x.float().std() > 20


def test_shared_celeba_original():
    z = _shared("celeba/celeba-align-32-original.zip")
    x = D.load_images("celeba", z)
    assert x.dtype == torch.uint8 and x.shape == (32, 3, 64, 64)
    with zipfile.ZipFile(z) as zf:
        img = np.asarray(Image.open(io.BytesIO(zf.read("img_align_celeba/000001.jpg"))).convert("RGB"))
    assert img.shape == (218, 178, 3)
    patch = img[29:189, 9:169].transpose(2, 0, 1).astype(np.float64)
    ref = np.clip(np.round(_resize_numpy(patch, 64, 64)), 0, 255)
    assert np.abs(x[0].numpy().astype(int) - ref).max() <= 1


def test_shared_celeba_halfres():
    z = _shared("celeba/celeba-align-5k-halfres.zip")
    x = D.load_images("celeba", z, limit=64)
    assert x.dtype == torch.uint8 and x.shape == (64, 3, 64, 64)


def test_cache_respects_read_only_root(tmp_path, monkeypatch):
    z = _write_zip(tmp_path / "ro.zip", {"a.png": np.zeros((4, 4, 3), dtype=np.uint8)})
    root = tmp_path / "readonly_root"
    root.mkdir()
    root.chmod(0o555)
    monkeypatch.setenv("NUMGAN_DATA", str(root))
    try:
        with pytest.warns(UserWarning, match="could not write the image cache"):
            x = D.load_images(str(z))
        assert x.shape == (1, 3, 4, 4) and not (root / "cache").exists()
    finally:
        root.chmod(0o755)


def test_corrupt_image_named_in_error(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok.png", _png(np.zeros((4, 4, 3), dtype=np.uint8)))
        zf.writestr("broken.jpg", b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        D.load_images(str(z), cache=False)
