"""The one home of picture conversions: bytes -> PIL, PIL <-> tensor, and the picture suffixes.

Tensors of pictures are either uint8 `(3, H, W)` / `(B, 3, H, W)` (what data batches
carry) or float in `[0, 1]` (what the models read and write).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# What folders of pictures are searched for (data sources, search, classify).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def decode_image(data: bytes) -> Image.Image | None:
    """Decodes image bytes fully (so truncation shows now, not later) as RGB; None if broken."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def to_square_rgb(image: Image.Image, size: int) -> Image.Image:
    """Centre-crops to a square and resizes to size x size RGB."""
    image = image.convert("RGB")
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def pil_to_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """A PIL image as a (3, H, W) float tensor in [0, 1], resized to size x size if given."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) float tensor in [0, 1] as an 8-bit RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as an RGB PIL image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 1]."""
    return images.float() / 255.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, 3, H, W), rounded."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def read_images(paths: list[str], size: int | None = None) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Reads pictures as (path, (3, S, S) float) pairs; unreadable ones are listed, not raised
    (and logged when some others were read: when none was, the caller's error says so)."""
    good, bad = [], []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            bad.append(path)
            continue
        image = decode_image(data)
        if image is None:
            bad.append(path)
        else:
            good.append((path, pil_to_tensor(image, size)))
    for path in bad if good else []:
        log.warning("skipped %s: missing or not a readable image", path)
    return good, bad
