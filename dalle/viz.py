"""Pictures for people: grids of images with their captions or scores written under them.

Pillow only. Small images are scaled up with nearest-neighbour so that 32-pixel shapes
stay crisp and the text under them fits.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _upscale(image: Image.Image, cell: int) -> Image.Image:
    image = image.convert("RGB")
    if image.size == (cell, cell):
        return image
    resample = Image.Resampling.NEAREST if image.width <= cell else Image.Resampling.LANCZOS
    return image.resize((cell, cell), resample)


def labelled_grid(rows: list[list[Image.Image]], labels: list[list[str]] | None = None,
                  row_titles: list[str] | None = None, cell: int = 96, label_lines: int = 3) -> Image.Image:
    """A grid: one list of images per row, an optional label under each and a title per row.

    Args:
        rows: images, row by row (rows may differ in length).
        labels: text under each image, same layout as `rows`.
        row_titles: text above each row (e.g. the prompt).
        cell: the side each image is scaled to.
        label_lines: how many wrapped lines of label to leave room for.
    """
    font = _font()
    line_height = 13
    pad = 4
    label_height = line_height * label_lines if labels else 0
    title_height = line_height + 2 if row_titles else 0
    columns = max((len(row) for row in rows), default=1)
    width = pad + columns * (cell + pad)
    row_height = title_height + cell + label_height + pad
    canvas = Image.new("RGB", (width, pad + len(rows) * row_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    chars_per_line = max(8, cell // 6)
    for r, row in enumerate(rows):
        top = pad + r * row_height
        if row_titles:
            draw.text((pad, top), row_titles[r][: width // 6], fill=TEXT, font=font)
        for c, image in enumerate(row):
            left = pad + c * (cell + pad)
            canvas.paste(_upscale(image, cell), (left, top + title_height))
            if labels:
                lines = textwrap.wrap(labels[r][c], chars_per_line)[:label_lines]
                for k, line in enumerate(lines):
                    draw.text((left, top + title_height + cell + 1 + k * line_height), line, fill=TEXT, font=font)
    return canvas


def caption_grid(pairs: list[tuple[Image.Image, str]], columns: int = 8, cell: int = 96) -> Image.Image:
    """(image, caption) pairs laid out `columns` to a row, the caption under each."""
    rows = [pairs[i : i + columns] for i in range(0, len(pairs), columns)]
    return labelled_grid([[image for image, _ in row] for row in rows],
                         [[caption for _, caption in row] for row in rows], cell=cell)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Writes a PNG (whatever the name's suffix) through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a picture's file name", str(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:  # a new file (O_EXCL), renamed over `path`: a symlink planted at `path` is replaced, not followed
        with os.fdopen(descriptor, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, width: int = 420,
               height: int = 220) -> Image.Image:
    """A small line chart (e.g. training loss against step), one colour per series."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    left, right, top, bottom = 44, width - 10, 20, height - 24
    points = [p for values in series.values() for p in values]
    draw.text((left, 4), title, fill=TEXT, font=font)
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    if not points:
        return canvas
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for k, (name, values) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        if len(values) > 1:
            draw.line([at(x, y) for x, y in values], fill=colour, width=2)
        draw.text((right - 90, top + 4 + 12 * k), name, fill=colour, font=font)
    draw.text((2, top), f"{y1:.3g}", fill=TEXT, font=font)
    draw.text((2, bottom - 10), f"{y0:.3g}", fill=TEXT, font=font)
    draw.text((left, bottom + 4), f"{x0:.0f}", fill=TEXT, font=font)
    draw.text((right - 40, bottom + 4), f"{x1:.0f}", fill=TEXT, font=font)
    return canvas
