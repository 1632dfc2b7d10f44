"""Image datasets for the CIFAR-10 and CelebA experiments (spec FIGURES.md Sec. 1.4).

Every loader returns the whole set as one ``torch.uint8`` tensor ``[N, 3, H, W]``: CIFAR-10 train
is 50,000 x 3 x 32 x 32 = 150 MB, small enough to live on the GPU, so drawing a batch is one
gather plus ``x / 255 * 2 - 1`` (``ImageSampler``) and loading never bottlenecks training.

Datasets (``load_images(dataset, ...)``):

* ``"cifar10"``: official torchvision layouts under ``root`` (default ``data_dir()/"cifar10"``):
  ``cifar-10-batches-py`` (pickles, read through ``torchvision.datasets.CIFAR10``) or
  ``cifar-10-batches-bin/data_batch_1..5.bin`` (the binary version the spec names; 1 label byte
  + 3072 pixel bytes, R plane then G plane then B plane). Fallbacks: an ``.npz`` with ``x_train`` /
  ``x_test`` (NHWC uint8), a ``.zip`` or folder of images. Labels are ignored (spec 1.4); no
  augmentation.
* ``"celeba"``: ``img_align_celeba/*.jpg`` as a folder or a zip (default ``data_dir()/"celeba"``).
  Split by file number as spec 1.4 states: 000001..192599 = train, 192600.. = test. Preprocessing:
  decode RGB, centred square crop of side s (offsets floor((H-s)/2), floor((W-s)/2)), TF-1 legacy
  bilinear resize to 64x64 (``resize_bilinear_tf1``). s defaults to 160 (Fig 10 [DEFAULT]) and is
  given in pixels of the official 178-wide images; for other widths W it is scaled to
  round(s * W / 178) (the half-resolution offline copy: 160 -> 80).
* ``"folder:<path>"`` or a path to a folder / ``.zip`` of jpg/png images (any nesting).
* ``"synthetic"``: deterministic coloured gradients and shapes (NOT real data) so that smoke-scale
  notebooks run without any dataset.

Images decoded from JPEG/PNG are cached as ``.npy`` under ``data_dir()/"cache"`` so the second load
is a single file read.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import tempfile
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from numgan.paths import data_dir

__all__ = [
    "load_images",
    "resolve_dataset",
    "ImageSampler",
    "resize_bilinear_tf1",
    "center_crop_offsets",
    "celeba_crop_box",
    "read_cifar10_binary",
    "synthetic_images",
    "CELEBA_TRAIN_LAST",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CELEBA_TRAIN_LAST = 192599  # spec 1.4: 000001..192599 train, 192600..202599 test
CELEBA_REFERENCE_WIDTH = 178  # spec crop sizes refer to the aligned 178x218 (WxH) images
CELEBA_DEFAULT_CROP = 160  # Fig 10 [DEFAULT] (the 6b6df36 setting; 128 at release)
CELEBA_DEFAULT_SIZE = 64
SYNTHETIC_DEFAULT_N = 512
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CACHE_VERSION = 1
_CHUNK = 1024

CIFAR10_HELP = (
    "How to get CIFAR-10: `python -c \"import torchvision; torchvision.datasets.CIFAR10('{root}', "
    "download=True)\"` (needs a network), or download "
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (or cifar-10-python.tar.gz) and "
    "extract it into {root}; or set NUMGAN_DATA (now {data}) to a directory containing cifar10/; "
    "or pass root= a folder, .zip or .npz (x_train, NHWC uint8) of images."
)
CELEBA_HELP = (
    "How to get CelebA: download img_align_celeba.zip (Align&Cropped images) from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and put it (zipped or extracted as "
    "img_align_celeba/) into {root}, or use torchvision.datasets.CelebA('{parent}', download=True); "
    "or set NUMGAN_DATA (now {data}) to a directory containing celeba/; or pass root= the folder or "
    ".zip of the images."
)


# ----------------------------------------------------------------------------------------------
# Geometry: centred crop and the TF-1 legacy bilinear resize
# ----------------------------------------------------------------------------------------------

def center_crop_offsets(height: int, width: int, side: int) -> tuple[int, int]:
    """(top, left) of a centred ``side`` x ``side`` crop: floor((H - s)/2), floor((W - s)/2) (spec 1.4).

    For the aligned CelebA images (H=218, W=178): s=160 -> (29, 9), s=128 -> (45, 25).
    """
    if side < 1 or side > height or side > width:
        raise ValueError(f"crop side {side} does not fit an image of {height}x{width} (HxW)")
    return (height - side) // 2, (width - side) // 2


def celeba_crop_box(height: int, width: int, crop: int = CELEBA_DEFAULT_CROP) -> tuple[int, int, int]:
    """(top, left, side) of the CelebA crop for an image of ``height`` x ``width``.

    ``crop`` is in pixels of the official 178-wide aligned images; other widths scale it to
    round(crop * width / 178) (round half up), e.g. 160 -> 80 for the 89x109 half-resolution copy.
    """
    side = int(math.floor(crop * width / CELEBA_REFERENCE_WIDTH + 0.5))
    top, left = center_crop_offsets(height, width, side)
    return top, left, side


def resize_bilinear_tf1(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TF-1 ``tf.image.resize_images`` does it (spec 1.4), float32 output.

    Legacy alignment: align_corners=False and NO half-pixel centres, i.e. the source coordinate of
    output pixel i is ``i * in / out`` (not ``(i + 0.5) * in / out - 0.5`` as in
    ``F.interpolate(mode="bilinear")``), the lower neighbour is its floor, the upper one is clamped
    to the last row/column, and there is no antialiasing. Arithmetic in float32 in TF's order
    (lerp along x, then along y). ``images``: ``[..., H, W]`` of any real dtype (uint8 in 0..255 is
    fine: the resize is linear, so it commutes with the /255 scaling up to rounding).
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {size}")
    x = images
    in_h, in_w = x.shape[-2], x.shape[-1]

    def axis(n_in: int, n_out: int):
        scale = torch.tensor(n_in / n_out, dtype=torch.float32)  # TF: (float)in / out
        src = torch.arange(n_out, dtype=torch.float32) * scale
        lo = torch.floor(src).to(torch.int64).clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = (src - lo.to(torch.float32)).to(x.device)
        return lo.to(x.device), hi.to(x.device), frac

    y0, y1, fy = axis(in_h, out_h)
    x0, x1, fx = axis(in_w, out_w)
    # Gather on the input dtype (uint8 moves 4x less memory), then compute in float32.
    # Advanced indexing: much faster than index_select on the trailing dims on CPU.
    rows0, rows1 = x[..., y0, :], x[..., y1, :]
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    top_l, top_r = f32(rows0[..., x0]), f32(rows0[..., x1])
    bot_l, bot_r = f32(rows1[..., x0]), f32(rows1[..., x1])
    top = (top_r - top_l).mul_(fx).add_(top_l)  # = top_l + (top_r - top_l) * fx, as in TF
    bottom = (bot_r - bot_l).mul_(fx).add_(bot_l)
    return (bottom - top).mul_(fy[:, None]).add_(top)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    # The spec keeps the resized image in float; storing uint8 adds at most 0.5/255 rounding
    # error, the price of keeping the whole set on the GPU as uint8.
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _crop_resize_tensor(images: torch.Tensor, crop: int | None, image_size: int | None) -> torch.Tensor:
    """Centred square crop (side ``crop``, default min(H, W)) then TF-1 resize (default no resize)."""
    if crop is None and image_size is None:
        return images
    h, w = images.shape[-2:]
    side = crop if crop is not None else min(h, w)
    top, left = center_crop_offsets(h, w, side)
    out = images[..., top:top + side, left:left + side]
    if image_size is not None and image_size != side:
        out = torch.cat([_to_uint8(resize_bilinear_tf1(c, image_size)) for c in out.split(_CHUNK)])
    return out.contiguous()


# ----------------------------------------------------------------------------------------------
# Reading image files (folders and zips, no extraction)
# ----------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return (name.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith(".")
            and not name.startswith("__MACOSX/"))


def _list_images(path: Path) -> list[str]:
    """Sorted image names (relative posix paths) inside a folder or a zip."""
    if path.is_dir():
        return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                      if p.is_file() and _is_image(p.relative_to(path).as_posix()))
    with zipfile.ZipFile(path) as zf:
        return sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image(n))


def _iter_bytes(path: Path, names: list[str]):
    """Yield the raw bytes of each named image, in order."""
    if path.is_dir():
        for n in names:
            yield (path / n).read_bytes()
    else:
        with zipfile.ZipFile(path) as zf:
            for n in names:
                yield zf.read(n)


def _decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB uint8 array [H, W, 3]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class _SizeMismatch(Exception):
    pass


def _decode_all(path: Path, names: list[str], box) -> torch.Tensor:
    """Decode ``names`` from ``path``; ``box(h, w)`` gives (top, left, side, out) or None (keep as is).

    Images are cropped in numpy, grouped by crop size and resized in batches; all outputs must have
    the first one's shape (else ``_SizeMismatch``).
    """
    if not names:
        raise ValueError(f"no images selected from {path}")
    out: torch.Tensor | None = None
    workers = max(1, min(8, os.cpu_count() or 1))

    def prep(item):
        name, data = item
        try:
            img = _decode_image(data)
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: cannot decode image {name!r} ({e})") from e
        geom = box(img.shape[0], img.shape[1])
        if geom is None:
            return img, None
        top, left, side, size = geom
        return img[top:top + side, left:left + side], size

    with ThreadPoolExecutor(workers) as pool:
        it = _iter_bytes(path, names)
        for start in range(0, len(names), _CHUNK):
            chunk = [(n, next(it)) for n in names[start:start + _CHUNK]]
            items = list(pool.map(prep, chunk))
            groups: dict[tuple, list[int]] = {}
            for i, (img, size) in enumerate(items):
                groups.setdefault((img.shape, size), []).append(i)
            for (shape, size), idx in groups.items():
                batch = torch.from_numpy(np.stack([items[i][0] for i in idx])).permute(0, 3, 1, 2)
                if size is not None and (shape[0], shape[1]) != (size, size):
                    batch = _to_uint8(resize_bilinear_tf1(batch, size))
                if out is None:
                    out = torch.empty((len(names),) + tuple(batch.shape[1:]), dtype=torch.uint8)
                if batch.shape[1:] != out.shape[1:]:
                    raise _SizeMismatch(f"{tuple(batch.shape[1:])} vs {tuple(out.shape[1:])}")
                out[torch.tensor(idx) + start] = batch
    return out


# ----------------------------------------------------------------------------------------------
# CIFAR-10 formats
# ----------------------------------------------------------------------------------------------

def read_cifar10_binary(files) -> torch.Tensor:
    """Parse CIFAR-10 binary batch files (``data_batch_k.bin``) into uint8 ``[N, 3, 32, 32]``.

    Each record is 1 label byte followed by 3072 pixel bytes: the 1024 red values, then green, then
    blue, each plane row-major 32x32. Labels are dropped (spec 1.4).
    """
    arrays = []
    for f in files:
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size == 0 or raw.size % _CIFAR_RECORD:
            raise ValueError(f"{f}: size {raw.size} bytes is not a multiple of the CIFAR-10 record "
                             f"size {_CIFAR_RECORD} (1 label byte + 3072 pixel bytes)")
        arrays.append(raw.reshape(-1, _CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32))
    return torch.from_numpy(np.concatenate(arrays))


def _cifar_binary(path: Path, split: str) -> torch.Tensor:
    if split == "test":
        return read_cifar10_binary([path / "test_batch.bin"])
    files = [path / f"data_batch_{k}.bin" for k in range(1, 6)]
    present = [f for f in files if f.is_file()]
    if len(present) < 5:
        warnings.warn(f"{path}: only {len(present)} of data_batch_1..5.bin present; loading those")
    return read_cifar10_binary(present)


def _cifar_pickle(path: Path, split: str) -> torch.Tensor:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(path.parent), train=(split == "train"), download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise ValueError(f"{path}: torchvision rejects the CIFAR-10 pickles ({e}); re-download them "
                         f"or use the binary version") from e
    return torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()


def _npz_images(path: Path, split: str) -> torch.Tensor:
    key = "x_test" if split == "test" else "x_train"
    with np.load(path) as z:
        if key not in z.files:
            raise ValueError(f"{path} has no array '{key}' (keys: {z.files})")
        x = z[key]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{path}['{key}'] must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _npz_has(path: Path, key: str) -> bool:
    try:
        with np.load(path) as z:
            return key in z.files
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


# ----------------------------------------------------------------------------------------------
# Resolution: which files a dataset name refers to
# ----------------------------------------------------------------------------------------------

def _check_split(dataset: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split={split!r} is not valid for {dataset!r}; use one of {allowed}")


def _generic_kind(path: Path) -> tuple[str, Path]:
    if path.is_dir():
        return "folder", path
    if path.is_file() and path.suffix.lower() == ".zip":
        return "zip", path
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz", path
    raise FileNotFoundError(
        f"image folder/zip {path} not found (or not a folder, .zip or .npz). Pass an existing folder "
        f"of jpg/png images, a .zip of them, or an .npz with x_train (NHWC uint8).")


def _resolve_cifar(root: Path, split: str) -> tuple[str, Path]:
    if root.is_file():
        return _generic_kind(root)
    looked = []
    py = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    need_py = "test_batch" if split == "test" else "data_batch_1"
    looked.append(f"{py}/{need_py} (python pickles)")
    if (py / need_py).is_file():
        return "cifar10-pickle", py
    binary = root if (root / "data_batch_1.bin").is_file() or (root / "test_batch.bin").is_file() \
        else root / "cifar-10-batches-bin"
    need_bin = "test_batch.bin" if split == "test" else "data_batch_1.bin"
    looked.append(f"{binary}/{need_bin} (binary version)")
    if (binary / need_bin).is_file():
        return "cifar10-binary", binary
    looked.append(f"{root}/*{split}*.zip (images)")
    if root.is_dir():
        zips = sorted(root.glob("*.zip"))
        named = [z for z in zips if split in z.stem.lower()]
        other = "test" if split == "train" else "train"
        unnamed = [z for z in zips if split not in z.stem.lower() and other not in z.stem.lower()]
        if named or len(unnamed) == 1:
            return "zip", (named or unnamed)[0]
    looked.append(f"{root / split}/ (folder of images)")
    if (root / split).is_dir() and _list_images(root / split):
        return "folder", root / split
    key = "x_test" if split == "test" else "x_train"
    looked.append(f"{root}/*.npz with '{key}' (last: an npz may hold a subset)")
    if root.is_dir():
        for npz in sorted(root.glob("*.npz")):
            if _npz_has(npz, key):
                return "npz", npz
    raise FileNotFoundError(
        f"CIFAR-10 ({split}) not found under {root}. Looked for: " + "; ".join(looked) + ". "
        + CIFAR10_HELP.format(root=root, data=data_dir()))


def _resolve_celeba(root: Path) -> tuple[str, Path]:
    if root.is_file() and root.suffix.lower() == ".zip":
        return "zip", root
    looked = [f"{root}/img_align_celeba/ (folder)", f"{root}/img_align_celeba.zip",
              f"{root}/*.zip (one zip of the aligned images)", f"{root}/*.jpg"]
    if (root / "img_align_celeba").is_dir():
        return "folder", root / "img_align_celeba"
    if (root / "img_align_celeba.zip").is_file():
        return "zip", root / "img_align_celeba.zip"
    if root.is_dir():
        zips = sorted(root.glob("*.zip"))
        if len(zips) == 1:
            return "zip", zips[0]
        if len(zips) > 1:
            raise FileNotFoundError(
                f"several zips under {root} ({', '.join(z.name for z in zips)}): pass root= the one "
                f"to use")
        if any(_is_image(p.name) for p in root.glob("*.jp*g")):
            return "folder", root
    raise FileNotFoundError(
        f"CelebA not found under {root}. Looked for: " + "; ".join(looked) + ". "
        + CELEBA_HELP.format(root=root, parent=root.parent, data=data_dir()))


def _split_name(dataset: str) -> tuple[str, str | None]:
    """Normalise a dataset argument to (name, path-or-None)."""
    if dataset in ("cifar10", "celeba", "synthetic"):
        return dataset, None
    if dataset.startswith("folder:"):
        return "folder", dataset[len("folder:"):]
    if "/" in dataset or os.sep in dataset or dataset.lower().endswith((".zip", ".npz")) \
            or Path(dataset).expanduser().exists():
        return "folder", dataset
    raise ValueError(f"unknown dataset {dataset!r}: use 'cifar10', 'celeba', 'synthetic', "
                     f"'folder:<path>' or a path to a folder/.zip of images")


def resolve_dataset(name: str, root=None, split: str = "train") -> tuple[str, Path | None]:
    """Say which files ``load_images(name, root, split=split)`` would read, without reading them.

    Returns ``(kind, path)`` with kind one of ``"cifar10-pickle"``, ``"cifar10-binary"``, ``"npz"``,
    ``"zip"``, ``"folder"``, ``"synthetic"`` (path None). Raises FileNotFoundError naming every place
    looked at and how to get the data.
    """
    dataset, path = _split_name(name)
    if dataset == "synthetic":
        return "synthetic", None
    if dataset == "folder":
        return _generic_kind(Path(path if root is None else root).expanduser())
    base = Path(root).expanduser() if root is not None else data_dir() / dataset
    if dataset == "cifar10":
        _check_split("cifar10", split, ("train", "test"))
        return _resolve_cifar(base, split)
    _check_split("celeba", split, ("train", "test", "all"))
    return _resolve_celeba(base)


# ----------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------

def synthetic_images(n: int = SYNTHETIC_DEFAULT_N, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic SYNTHETIC images (not real data): uint8 ``[n, 3, S, S]``.

    Each image is a linear colour gradient in a random direction with a random disc and a random
    axis-aligned square painted on top. Same (n, image_size, seed) -> same images.
    """
    if n < 1 or image_size < 2:
        raise ValueError(f"need n >= 1 and image_size >= 2, got n={n}, image_size={image_size}")
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    s = image_size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    angle = r(n, 1, 1) * 2 * math.pi
    t = ((xx - 0.5) * torch.cos(angle) + (yy - 0.5) * torch.sin(angle)) / math.sqrt(2) + 0.5
    c0, c1 = r(n, 3, 1, 1), r(n, 3, 1, 1)
    img = c0 + (c1 - c0) * t[:, None]
    cy, cx, rad = r(n, 1, 1), r(n, 1, 1), 0.1 + 0.25 * r(n, 1, 1)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2)[:, None]
    img = torch.where(disc, r(n, 3, 1, 1), img)
    sy, sx, half = r(n, 1, 1), r(n, 1, 1), 0.05 + 0.15 * r(n, 1, 1)
    square = (((yy - sy).abs() <= half) & ((xx - sx).abs() <= half))[:, None]
    img = torch.where(square, r(n, 3, 1, 1), img)
    return _to_uint8(img * 255)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

def _cache_path(cache, dataset: str, path: Path, names: list[str], params: tuple) -> Path:
    st = path.stat()
    ident = (_CACHE_VERSION, dataset, str(path.resolve()), st.st_size if path.is_file() else 0,
             st.st_mtime_ns if path.is_file() else 0, len(names),
             hashlib.sha1("\n".join(names).encode()).hexdigest(), params)
    digest = hashlib.sha1(repr(ident).encode()).hexdigest()[:16]
    folder = Path(cache) if isinstance(cache, (str, os.PathLike)) else data_dir() / "cache"
    return folder / f"{dataset}-{path.stem}-{digest}.npy"


def _save_atomic(arr: np.ndarray, target: Path) -> None:
    # Respect folders marked read-only (e.g. a shared data copy) even when running as root,
    # who could otherwise write into them.
    existing = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not existing.stat().st_mode & stat.S_IWUSR:
        raise PermissionError(f"{existing} is marked read-only")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the cache normal permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _decode_cached(dataset: str, path: Path, names: list[str], box, params: tuple, cache) -> torch.Tensor:
    target = _cache_path(cache, dataset, path, names, params) if cache else None
    if target is not None and target.is_file():
        return torch.from_numpy(np.load(target))
    images = _decode_all(path, names, box)
    if target is not None:
        try:
            _save_atomic(images.numpy(), target)
        except OSError as e:  # e.g. a read-only data root: loading still works, only slower next time
            warnings.warn(f"could not write the image cache {target}: {e}")
    return images


# ----------------------------------------------------------------------------------------------
# Public loader
# ----------------------------------------------------------------------------------------------

def _celeba_names(names: list[str], split: str, path: Path) -> list[str]:
    if split == "all":
        return names
    kept = []
    for n in names:
        stem = n.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if not stem.isdigit():
            raise ValueError(f"{path}: CelebA file {n!r} has no number, so split={split!r} cannot be "
                             f"decided; use split='all'")
        if (int(stem) <= CELEBA_TRAIN_LAST) == (split == "train"):
            kept.append(n)
    return kept


def load_images(dataset: str, root=None, *, image_size: int | None = None, crop: int | None = None,
                limit: int | None = None, split: str = "train", download: bool = False,
                cache=True, seed: int = 0) -> torch.Tensor:
    """Load a whole image set as a ``torch.uint8`` tensor ``[N, 3, H, W]`` (spec 1.4).

    Args:
        dataset: ``"cifar10"``, ``"celeba"``, ``"synthetic"``, ``"folder:<path>"`` or a path to a
            folder / ``.zip`` of images (or an ``.npz`` with ``x_train``).
        root: where the data is (default ``data_dir()/<dataset>``; for generic folders, overrides
            the path in ``dataset``). May point directly at a zip, npz or image folder.
        image_size: output side. CelebA: default 64. CIFAR-10: default unchanged (32). Folders:
            default unchanged; if given, images are centre-cropped to a square and resized.
        crop: side of the centred square crop before resizing. CelebA: default 160, in pixels of
            the 178-wide official images (scaled to the actual width). Others: actual pixels,
            default min(H, W) when resizing.
        limit: keep only the first ``limit`` images (sorted file order / file order).
        split: ``"train"`` or ``"test"`` (CIFAR-10, CelebA); ``"all"`` (CelebA, folders).
            CelebA train is files 000001..192599, test 192600.. (spec 1.4).
        download: CIFAR-10 only: if nothing is found, try ``torchvision``'s download into ``root``.
        cache: decoded JPEG/PNG sets are saved as ``.npy`` under ``data_dir()/"cache"`` (or under
            this path if it is one) and re-read from there; False disables the cache.
        seed: seed of the synthetic set (``limit`` = its size, default 512; ``image_size`` default 32).

    Folders whose images differ in size and no ``image_size``: every image is centre-cropped to a
    square and resized to the shorter side of the first image (sorted order).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    for arg, val in (("image_size", image_size), ("crop", crop)):
        if val is not None and val < 1:
            raise ValueError(f"{arg} must be a positive integer or None, got {val}")
    name, _ = _split_name(dataset)
    if name == "synthetic":
        return synthetic_images(limit or SYNTHETIC_DEFAULT_N, image_size or 32, seed)
    if name == "folder":
        _check_split(dataset, split, ("train", "all"))
    try:
        kind, path = resolve_dataset(dataset, root, split)
    except FileNotFoundError:
        if not (download and name == "cifar10"):
            raise
        kind, path = _download_cifar(Path(root).expanduser() if root else data_dir() / "cifar10", split)

    if kind in ("cifar10-pickle", "cifar10-binary", "npz"):
        read = {"cifar10-pickle": _cifar_pickle, "cifar10-binary": _cifar_binary, "npz": _npz_images}
        images = read[kind](path, split)
        if limit is not None:
            images = images[:limit].clone()
        return _crop_resize_tensor(images, crop, image_size)

    names = _list_images(path)
    if not names:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    if name == "celeba":
        names = _celeba_names(names, split, path)
        names = names[:limit] if limit is not None else names
        side, crop_ref = image_size or CELEBA_DEFAULT_SIZE, crop or CELEBA_DEFAULT_CROP
        box = lambda h, w: (*celeba_crop_box(h, w, crop_ref), side)  # noqa: E731
        return _decode_cached("celeba", path, names, box, (split, limit, crop_ref, side), cache)

    names = names[:limit] if limit is not None else names
    if crop is None and image_size is None:
        try:
            return _decode_cached(name, path, names, lambda h, w: None, (split, limit, None, None), cache)
        except _SizeMismatch:
            # Sizes differ: square-crop and resize everything to the first image's shorter side.
            h, w = _decode_image(next(_iter_bytes(path, names[:1]))).shape[:2]
            image_size = min(h, w)

    def box(h, w):
        side = crop if crop is not None else min(h, w)
        return (*center_crop_offsets(h, w, side), side, image_size or side)

    return _decode_cached(name, path, names, box, (split, limit, crop, image_size), cache)


def _download_cifar(root: Path, split: str) -> tuple[str, Path]:
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(str(root), train=(split == "train"), download=True)
    except Exception as e:  # no network, blocked host, disk full ...
        raise FileNotFoundError(
            f"CIFAR-10 not found under {root} and the torchvision download failed ({e!r}). "
            + CIFAR10_HELP.format(root=root, data=data_dir())) from e
    return "cifar10-pickle", root / "cifar-10-batches-py"


# ----------------------------------------------------------------------------------------------
# Batches for training
# ----------------------------------------------------------------------------------------------

class ImageSampler:
    """Random minibatches in [-1, 1] from a uint8 image tensor kept on ``device``.

    Spec 1.4 [DEFAULT]: plain random shuffling per epoch. Each epoch is a fresh permutation drawn
    from a CPU ``torch.Generator`` seeded with ``seed`` (so the sequence does not depend on the
    device); a batch that runs past the end of an epoch continues into the next permutation, so
    every image is drawn exactly once per epoch. ``state_dict()`` / ``load_state_dict()`` resume
    the exact batch sequence.
    """

    def __init__(self, images, batch_size: int, device="cpu", seed: int = 0):
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W] (see load_images), got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        if images.shape[0] < 1 or batch_size < 1:
            raise ValueError(f"need at least one image and batch_size >= 1, got N={images.shape[0]}, "
                             f"batch_size={batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0
        self.position = 0
        self._set_permutation(self._new_permutation())

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    def _new_permutation(self) -> torch.Tensor:
        return torch.randperm(len(self), generator=self.generator)

    def _set_permutation(self, perm: torch.Tensor) -> None:
        self._perm = perm  # CPU copy for state_dict
        self._perm_device = perm.to(self.device)  # one host->device copy per epoch, not per batch

    def next_indices(self) -> torch.Tensor:
        """Indices (int64, on ``device``) of the next batch, advancing the sampler."""
        parts, need = [], self.batch_size
        while need > 0:
            if self.position == len(self):
                self._set_permutation(self._new_permutation())
                self.position = 0
                self.epoch += 1
            take = min(need, len(self) - self.position)
            parts.append(self._perm_device[self.position:self.position + take])
            self.position += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def next(self) -> torch.Tensor:
        """Next batch: float32 ``[B, C, H, W]`` on ``device``, ``uint8 / 255 * 2 - 1``."""
        batch = self.images.index_select(0, self.next_indices())
        return batch.to(torch.float32).div_(255).mul_(2).sub_(1)

    __call__ = next
    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Everything needed to continue the same batch sequence (tensors on CPU)."""
        return {"seed": self.seed, "n": len(self), "batch_size": self.batch_size, "epoch": self.epoch,
                "position": self.position, "permutation": self._perm.clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; the image set must have the same size."""
        if state["n"] != len(self):
            raise ValueError(f"sampler state is for {state['n']} images, this sampler has {len(self)}")
        self.seed, self.batch_size = int(state["seed"]), int(state["batch_size"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._set_permutation(state["permutation"].clone().cpu())
        self.generator.set_state(state["generator"].cpu())
