"""Which image codes an edit redraws: a box or a mask picture, turned into a mask over the code grid.

The picture is resized to the model's size (S x S) as `Pipeline.encode_image` resizes it;
the region is resized the same way, and a code is redrawn when any pixel of its cell
(S / grid pixels square) is in the region.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from dalle.errors import DalleError

MAX_SIDE = 4096  # larger pictures (and decompression bombs) are refused, not decoded


def read_picture(path: str | Path | BinaryIO | Image.Image, what: str = "picture", mode: str = "RGB") -> Image.Image:
    """A picture (a file, or its bytes in a file object) fully decoded, or a one-line error naming it."""
    if isinstance(path, Image.Image):
        return path.convert(mode)
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_SIDE:
                where = "" if hasattr(path, "read") else f" {path}"
                raise DalleError(f"the {what}{where} is {image.size[0]}x{image.size[1]}: at most "
                                 f"{MAX_SIDE}x{MAX_SIDE} pixels")
            image.load()
            return image.convert(mode)
    except DalleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "" if hasattr(path, "read") else f" {path}"
        raise DalleError(f"cannot read the {what}{where}: {reason}") from None


def parse_box(text: str) -> tuple[int, int, int, int]:
    """`x0,y0,x1,y1` (pixels of the picture, x1 and y1 excluded) as four ints."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(re.fullmatch(r"-?[0-9]+", p) for p in parts):  # not "²": isdigit, not int
        raise DalleError(f"a box is x0,y0,x1,y1 in pixels, e.g. 0,0,16,16; got {text!r}")
    x0, y0, x1, y1 = (int(p) for p in parts)
    return x0, y0, x1, y1


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: True inside the box, clipped to the picture."""
    width, height = size
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise DalleError(f"the box {x0},{y0},{x1},{y1} is empty: need x0 < x1 and y0 < y1")
    mask = np.zeros((height, width), dtype=bool)
    mask[max(0, y0):max(0, min(height, y1)), max(0, x0):max(0, min(width, x1))] = True
    return mask


def region_to_codes(region: tuple[int, int, int, int] | str | Path | Image.Image, picture_size: tuple[int, int],
                    image_size: int, grid: int) -> torch.Tensor:
    """(grid * grid,) bool in raster order: True where the edit redraws the code.

    Args:
        region: a box (x0, y0, x1, y1) or "x0,y0,x1,y1", or a mask picture (path or PIL)
            of the picture's size, white (> 127) where to redraw.
        picture_size: (width, height) of the picture being edited.
        image_size: the model's picture side S.
        grid: the code grid side.
    """
    if isinstance(region, str) and "," in region and not Path(region).exists():
        region = parse_box(region)
    if isinstance(region, tuple | list):
        mask = box_mask(tuple(region), picture_size)
    else:
        image = read_picture(region, "mask", mode="L")
        if image.size != tuple(picture_size):
            raise DalleError(f"the mask is {image.size[0]}x{image.size[1]}, the picture "
                             f"{picture_size[0]}x{picture_size[1]}: they must be the same size")
        mask = np.asarray(image) > 127
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.Resampling.NEAREST)
    pixels = torch.from_numpy(np.asarray(resized) > 127)  # (S, S)
    cell = image_size // grid
    codes = pixels.view(grid, cell, grid, cell).any(dim=3).any(dim=1).flatten()  # (grid * grid,)
    if not codes.any():
        raise DalleError("the region to redraw is empty (or smaller than one code cell after resizing)")
    if codes.all():
        raise DalleError("the region covers the whole picture: that is `dalle generate`, not an edit")
    return codes
