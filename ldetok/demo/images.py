"""Input images for the demo: files, arrays and the bundled sources, always to 8-bit RGB with notices.

- ``read_image``: a file; a non-image is refused with a clear message naming it, a huge image is
  resized (with a notice), grayscale / palette / RGBA (over white) / 16-bit / 32-bit images are
  converted (with a notice), the EXIF orientation is applied;
- ``prepare_image``: a file, a PIL image or an array of any dtype;
- ``bundled_photo`` / ``fashion_mnist_image``: the offline sources;
- ``to_model_input`` (ADM centre crop to a tokenizer's size), ``to_display`` (a common display size).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data import FASHION_CLASSES, build_dataset, bundled_photos, center_crop_adm, from_uint8, to_uint8

__all__ = ["DemoError", "InputImage", "MAX_INPUT_SIDE", "read_image", "prepare_image", "to_model_input",
           "display_size", "to_display", "bundled_photo", "fashion_mnist_choices", "fashion_mnist_image"]

MAX_INPUT_SIDE = 1024  # larger inputs are resized (with a notice); tokenizers see at most 256 px anyway


class DemoError(ValueError):
    """Bad input or a missing file, with a message meant for the user (the app shows it as is)."""


# =============================================================================================
# Input images
# =============================================================================================
@dataclass
class InputImage:
    pixels: np.ndarray  # uint8 (H, W, 3)
    name: str = "input"
    notices: List[str] = field(default_factory=list)


def _pil_to_rgb(im: Image.Image, notices: List[str]) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (the rules of ``ldetok.data.load_rgb``), noting what was converted."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(im, dtype=np.float64)
        full = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        notices.append(f"{'16-bit' if full > 255 else mode + '-mode'} grayscale image: rescaled to 8 bits and "
                       "shown as RGB")
        return Image.fromarray(np.clip(a * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        notices.append("image with transparency: composited over white")
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in ("L", "1"):
        notices.append("grayscale image: the grey is replicated to RGB")
    elif mode not in ("RGB", "P"):
        notices.append(f"{mode} image: converted to RGB")
    return im.convert("RGB")


def _limit_size(im: Image.Image, max_side: int, notices: List[str]) -> Image.Image:
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    notices.append(f"large image ({w}x{h}): resized to {size[0]}x{size[1]} for the demo")
    return im.resize(size, Image.LANCZOS, reducing_gap=3.0)


def _without_path(e: Exception, path: Path) -> str:
    """An error's text with the file's folder left out (an upload lives in a server's temporary folder,
    which is nobody else's business): Pillow's messages quote the whole path."""
    return str(e).replace(str(path), path.name).replace(str(path.resolve()), path.name)


def read_image(path, max_side: int = MAX_INPUT_SIDE) -> InputImage:
    """Open an image file as 8-bit RGB, at most ``max_side`` px on its long side.

    Raises ``DemoError`` for a missing file or one Pillow cannot read (naming the file); converts
    grayscale, palette, RGBA (over white), 16-bit and 32-bit images; applies the EXIF orientation;
    keeps the first frame of an animation. Every conversion is reported in ``notices``.
    """
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise DemoError(f"{name}: no such file")
    notices: List[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if getattr(im, "n_frames", 1) > 1:
                    notices.append(f"animated image ({im.n_frames} frames): the first frame is used")
                if im.format == "JPEG" and max(im.size) > 2 * max_side:
                    im.draft(im.mode, (max_side, max_side))  # decode at a reduced scale: fast for huge JPEGs
                im.load()
                im = ImageOps.exif_transpose(im) or im
                rgb = _pil_to_rgb(im, notices)
    except Image.DecompressionBombError as e:
        raise DemoError(f"{name}: too large to open safely ({_without_path(e, p)}); downscale it below "
                        f"{Image.MAX_IMAGE_PIXELS * 2 // 1_000_000} megapixels first") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:
        raise DemoError(f"{name} is not an image that Pillow can read ({type(e).__name__}: {_without_path(e, p)}). "
                        "Upload a PNG, JPEG, WebP, BMP, GIF or TIFF image.") from None
    rgb = _limit_size(rgb, max_side, notices)
    return InputImage(np.asarray(rgb, dtype=np.uint8).copy(), name, notices)


def prepare_image(image, max_side: int = MAX_INPUT_SIDE, name: str = "input") -> InputImage:
    """A file path, a PIL image, an ``InputImage`` or an array -> ``InputImage`` (uint8 RGB, limited size).

    Arrays: (H, W), (H, W, 1|3|4); uint8, uint16 (16-bit, rescaled), bool, or float (taken as [0, 1]
    when its maximum is at most 1, else as [0, 255]).
    """
    if isinstance(image, InputImage):
        return image
    if image is None:
        raise DemoError("no input image: upload one or choose a bundled photo or a dataset image")
    if isinstance(image, (str, Path)):
        return read_image(image, max_side)
    notices: List[str] = []
    if isinstance(image, Image.Image):
        im = _pil_to_rgb(image, notices)
    else:
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or a.size == 0:
            raise DemoError(f"{name}: expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), "
                            f"got {a.shape}")
        if a.dtype == np.uint16 or (a.dtype.kind in "iu" and a.max(initial=0) > 255):
            notices.append("16-bit image: rescaled to 8 bits")
            a = np.clip(a.astype(np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        elif a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype.kind == "f":
            a = np.nan_to_num(a.astype(np.float64))
            a = np.clip((a * 255.0 if a.max(initial=0) <= 1.0 else a) + 0.5, 0, 255).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        im = _pil_to_rgb(Image.fromarray(a), notices)
    im = _limit_size(im, max_side, notices)
    return InputImage(np.asarray(im, dtype=np.uint8).copy(), name, notices)


def to_model_input(pixels: np.ndarray, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, channels, size, size) float in [-1, 1]: ADM centre crop, then resize."""
    a = center_crop_adm(Image.fromarray(pixels), size)
    x = from_uint8(np.array(a, dtype=np.uint8)).permute(2, 0, 1)
    if channels == 1:
        x = x.mean(0, keepdim=True)
    return x.unsqueeze(0)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1|C, H, W) or (1, C, H, W) in [-1, 1] -> uint8 (H, W, 3), rounded (``data.to_uint8``)."""
    x = x.detach().cpu()
    if x.ndim == 4:
        x = x[0]
    x = to_uint8(x)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy().copy()


def display_size(sizes: Sequence[int], minimum: int = 192) -> int:
    """The common display size: the largest tokenizer size, at least ``minimum``."""
    return max([minimum, *[int(s) for s in sizes]])


def to_display(a: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (size, size, 3): nearest when enlarging (honest pixels), Lanczos when shrinking."""
    if a.shape[0] == size and a.shape[1] == size:
        return a
    up = a.shape[0] <= size and a.shape[1] <= size
    return np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST if up else Image.LANCZOS))


# =============================================================================================
# Input sources
# =============================================================================================
def bundled_photo(name: str, max_side: int = MAX_INPUT_SIDE) -> InputImage:
    """One of the 11 photos shipped inside scikit-image, scikit-learn and matplotlib."""
    photos = bundled_photos()
    if name not in photos:
        raise DemoError(f"unknown bundled photo {name!r}; choose one of {', '.join(photos)}")
    return prepare_image(photos[name], max_side, name=name)


@functools.lru_cache(maxsize=1)
def _fmnist_test():
    # 32 px, zero-padded from 28 as the Fashion-MNIST tokenizers were trained
    return build_dataset("fashion_mnist", split="test", image_size=32, channels=3)


def fashion_mnist_choices(n: int = 100) -> Tuple[List[str], Optional[str]]:
    """(["#0 Ankle boot", ...] for the first ``n`` test images, None) or ([], how to install the data)."""
    try:
        ds = _fmnist_test()
    except (FileNotFoundError, ValueError) as e:
        return [], str(e)
    return [f"#{i} {FASHION_CLASSES[int(ds.labels[i])]}" for i in range(min(n, len(ds)))], None


def fashion_mnist_image(choice) -> InputImage:
    """A Fashion-MNIST test image by index or by its ``"#12 Sneaker"`` choice string."""
    try:
        idx = int(str(choice).strip().lstrip("#").split()[0])
    except (ValueError, IndexError):
        raise DemoError(f"not a Fashion-MNIST test image: {choice!r} (expected an index like '#12')") from None
    try:
        ds = _fmnist_test()
    except (FileNotFoundError, ValueError) as e:
        raise DemoError(str(e)) from None
    if not 0 <= idx < len(ds):
        raise DemoError(f"Fashion-MNIST test image #{idx} does not exist (0 .. {len(ds) - 1})")
    x, y = ds.tensor_batch([idx])
    return InputImage(_to_uint8(x[0]), f"Fashion-MNIST test #{idx}", [])
