"""The DALL-E attention masks over one stream `[text block | image tokens]`.

Positions are stream positions: `0 .. text_len - 1` hold the text block, `text_len + a`
holds image token `a` (raster order over a `grid x grid` grid, `a = row * grid + col`).
A mask entry `mask[q, k]` is True when the query at position `q` may attend to the key
at position `k`. Every pattern is causal (`k <= q`), and:

- a text query attends to every earlier text position (the standard causal mask);
- an image query attends to every text position, and to earlier image tokens by the
  layer's pattern. With `d = a - b` the raster distance from query image token `a` back
  to key image token `b` (`0 <= d <= a`):

  - `causal`: every earlier image token (`d >= 0`).
  - `row`: the previous `grid + 1` tokens in raster order, itself included
    (`d <= grid`), so the oldest key is the token in the same column of the row above.
    This is the paper's mask (a) ("each image token attends to the previous 5 image
    tokens" for a 4x4 grid) and the Sparse Transformer's local "strided" head; it wraps
    around the row boundary instead of stopping at it.
  - `column`: the earlier tokens of the same column (`d % grid == 0`), the paper's mask
    (b) and the Sparse Transformer's strided head. (The paper transposes the image
    states for column layers to run them as row layers on a GPU; that is an
    implementation trick and does not change which tokens are seen.)
  - `conv`: a causal `kernel x kernel` window with the paper's wraparound, i.e. built
    from raster offsets: the query itself and the `kernel // 2` tokens before it in
    raster order, plus, for each of the `kernel // 2` rows above, the `kernel` tokens
    centred on the same column (`|d - r * grid| <= kernel // 2` for `r = 1 .. kernel // 2`).
    Offsets that run past a row's edge wrap into the neighbouring row, like the row mask.

The paper's layer layout (`"paper"`): column attention in layer `i` (0-based) where
`(i - 2) % 4 == 0`, row attention elsewhere, convolutional attention in the last layer.

`allowed` states the rule once, elementwise on integer tensors, so the same function
builds the dense boolean masks used by `scaled_dot_product_attention`, serves as the
FlexAttention `mask_mod` and masks the windows of `window_plan` (the CPU's way of skipping
what a sparse pattern leaves out). `reference_mask` rebuilds every mask position by
position from the definitions above, for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dalle.errors import DalleError

PATTERNS = ("causal", "row", "column", "conv")


def layer_patterns(attention: list[str], depth: int) -> list[str]:
    """One image-to-image pattern per layer.

    Args:
        attention: the config's list: `["paper"]` for the paper's layout, or pattern names
            (causal, row, column, conv) that are cycled over the layers when shorter than
            `depth` (so `["row"]` makes every layer a row layer).
        depth: the number of layers.
    """
    if not attention:
        raise DalleError("transformer.attention is empty: give 'paper' or a list of patterns")
    if "paper" in attention:
        if len(attention) != 1:
            raise DalleError("transformer.attention: 'paper' stands alone, it expands to the whole layout")
        patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(depth)]
        patterns[-1] = "conv"
        return patterns
    for name in attention:
        if name not in PATTERNS:
            raise DalleError(f"transformer.attention: unknown pattern {name!r} (causal, row, column, conv or paper)")
    return [attention[i % len(attention)] for i in range(depth)]


def allowed(q: Tensor, k: Tensor, pattern: str, text_len: int, grid: int, kernel: int) -> Tensor:
    """Whether stream position `q` may attend to stream position `k` (elementwise).

    Works on broadcastable integer tensors, and is traceable by FlexAttention, so it is
    both the dense-mask builder and the `mask_mod` of the block masks.
    """
    causal = k <= q
    text_key = k < text_len
    if pattern == "causal":
        return causal
    d = q - k  # raster distance between two image tokens; >= 0 where causal
    if pattern == "row":
        image_rule = d <= grid
    elif pattern == "column":
        image_rule = d % grid == 0
    elif pattern == "conv":
        half = kernel // 2
        # Is there a row offset r in [1, half] with |d - r * grid| <= half? The r that
        # qualify form the integer interval [ceil((d - half) / grid), floor((d + half) / grid)].
        lowest = torch.clamp(-((half - d) // grid), min=1)
        highest = torch.clamp((d + half) // grid, max=half)
        image_rule = (d <= half) | (lowest <= highest)
    else:
        raise DalleError(f"unknown attention pattern {pattern!r} (causal, row, column or conv)")
    # Text queries only ever see text keys (k <= q < text_len), so `text_key | image_rule`
    # is exact for them too; image queries see all text plus the pattern.
    return causal & (text_key | (q < text_len) | image_rule)


def build_mask(pattern: str, text_len: int, grid: int, kernel: int = 11, device=None) -> Tensor:
    """The dense (T, T) boolean mask of one pattern, T = text_len + grid**2; True = attend."""
    length = text_len + grid * grid
    positions = torch.arange(length, device=device)
    return allowed(positions[:, None], positions[None, :], pattern, text_len, grid, kernel)  # (T, T)


def image_key_slice(pattern: str, index: int, grid: int, kernel: int = 11) -> tuple[slice, bool]:
    """The image keys of image query `index`, as one slice of image indices.

    Decoding reads only these keys (and the text) from the cache instead of every earlier
    position: the previous `grid + 1` tokens for `row`, a strided slice for `column`, the
    span of the window for `conv`.

    Returns:
        The slice (over image indices `0 .. index`) and whether it has holes, i.e.
        positions the mask excludes (only `conv`'s span has them); without holes every
        key in the slice is attended.
    """
    if pattern == "causal":
        return slice(0, index + 1), False
    if pattern == "row":
        return slice(max(0, index - grid), index + 1), False
    if pattern == "column":
        return slice(index % grid, index + 1, grid), False
    if pattern == "conv":
        half = kernel // 2
        first = max(0, index - half * grid - half)
        return slice(first, index + 1), first < index - half
    raise DalleError(f"unknown attention pattern {pattern!r} (causal, row, column or conv)")


@dataclass
class WindowPlan:
    """How one sparse pattern attends in windows instead of over a dense (T, T) mask.

    The image tokens are put in `order` (raster, or column-major for `column`, where a
    column's tokens then lie side by side) and cut into chunks of `chunk` tokens; the
    queries of a chunk attend to the whole text block and to the image keys of the `back`
    chunks before it and its own, through `mask`. With chunks of four rows of a 16 x 16
    grid, a row query scores text + 128 image keys instead of the whole stream.

    Attributes:
        order: (N,) image indices in chunk order, or None for raster order.
        back: how many earlier chunks a chunk's window holds.
        mask: (chunks, chunk, text_len + (back + 1) * chunk) boolean, True = attend; keys
            before the first chunk (the window's padding) are False.
    """

    order: Tensor | None
    back: int
    mask: Tensor

    @property
    def text_len(self) -> int:
        """The text block's length: the mask's keys before the image window."""
        chunks, chunk, width = self.mask.shape
        return width - (self.back + 1) * chunk


def window_plan(pattern: str, text_len: int, grid: int, kernel: int = 11, chunk: int | None = None,
                device=None) -> WindowPlan | None:
    """The WindowPlan of a pattern, or None where windows would not save work (`causal`,
    or a window that spans most of the image).

    Args:
        chunk: image tokens per chunk, a divisor of grid**2; default: whole rows, at least
            32 tokens and at least the pattern's reach (so a window is its chunk and the one
            before), as few rows as divide the grid: smaller chunks skip more keys, but CPU attention kernels run small
            blocks far below their peak (measured in docs/EXPERIMENTS.md).
    """
    if pattern == "causal":
        return None
    n_image = grid * grid
    order = None
    if pattern == "row":
        reach = grid  # d <= grid
    elif pattern == "column":
        order = torch.arange(n_image).view(grid, grid).t().reshape(-1)  # a column's tokens side by side
        reach = grid - 1  # within the column: none when a chunk holds whole columns
    elif pattern == "conv":
        reach = (kernel // 2) * (grid + 1)  # d <= half * (grid + 1)
    else:
        raise DalleError(f"unknown attention pattern {pattern!r} (causal, row, column or conv)")
    if chunk is None:  # whole rows: the fewest that divide the grid and cover 32 tokens and the reach
        rows = next(r for r in range(1, grid + 1) if grid % r == 0 and r * grid >= min(max(32, reach), n_image))
        chunk = rows * grid
    if n_image % chunk:
        raise DalleError(f"window chunk {chunk} does not divide the {n_image} image tokens")
    if pattern == "column" and chunk % grid == 0:
        reach = 0
    back = -(-reach // chunk)
    chunks = n_image // chunk
    if (back + 1) * 2 > chunks:  # the windows would hold at least half the image
        return None
    in_order = order if order is not None else torch.arange(n_image)  # (N,) image index at each slot
    starts = torch.arange(chunks)[:, None] * chunk
    query_slot = starts + torch.arange(chunk)[None, :]  # (C, c)
    key_slot = starts - back * chunk + torch.arange((back + 1) * chunk)[None, :]  # (C, W)
    query_pos = text_len + in_order[query_slot]  # (C, c) stream positions
    key_pos = text_len + in_order[key_slot.clamp(min=0)]  # (C, W)
    image_mask = allowed(query_pos[:, :, None], key_pos[:, None, :], pattern, text_len, grid, kernel)
    image_mask &= (key_slot >= 0)[:, None, :]  # the padding before the first chunk
    text_mask = torch.ones(chunks, chunk, text_len, dtype=torch.bool)  # image queries see all text
    mask = torch.cat([text_mask, image_mask], dim=-1)  # (C, c, L + W)
    return WindowPlan(order.to(device) if order is not None else None, back, mask.to(device))


def reference_mask(pattern: str, text_len: int, grid: int, kernel: int = 11) -> Tensor:
    """The same mask as `build_mask`, built slowly position by position (for the tests)."""
    n_image = grid * grid
    length = text_len + n_image
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(text_len):
        mask[q, list(range(q + 1))] = True
    for a in range(n_image):
        q = text_len + a
        mask[q, list(range(text_len))] = True
        keys: set[int] = set()
        if pattern == "causal":
            keys = set(range(a + 1))
        elif pattern == "row":
            keys = set(range(max(0, a - grid), a + 1))
        elif pattern == "column":
            keys = set(range(a, -1, -grid))
        elif pattern == "conv":
            half = kernel // 2
            for dc in range(-half, 1):  # this row: the query and up to `half` tokens before it
                keys.add(a + dc)
            for dr in range(1, half + 1):  # rows above: `kernel` tokens around this column
                for dc in range(-half, half + 1):
                    keys.add(a - dr * grid + dc)
            keys = {b for b in keys if 0 <= b <= a}
        else:
            raise ValueError(pattern)
        mask[q, [text_len + b for b in sorted(keys)]] = True
    return mask


def flex_mask_mod(pattern: str, text_len: int, grid: int, kernel: int):
    """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for one pattern."""

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx, pattern, text_len, grid, kernel)

    mask_mod.__name__ = f"dalle_{pattern}_mask"
    return mask_mod


def save_masks_png(path: str | Path, patterns: list[str], text_len: int, grid: int, kernel: int = 11,
                   scale: int = 4) -> Path:
    """Writes a picture of the masks side by side, one panel per pattern (for the docs).

    Rows are queries, columns keys. Grey: text-to-text, blue: image-to-text, orange:
    image-to-image, black: masked out.

    Args:
        path: the PNG to write.
        patterns: the patterns to draw, e.g. `["row", "column", "conv", "causal"]`.
        text_len: the text block length.
        grid: the image grid side.
        kernel: the conv pattern's window.
        scale: pixels per mask cell.
    """
    length = text_len + grid * grid
    side = length * scale
    margin, caption = 8, 14
    canvas = Image.new("RGB", (len(patterns) * (side + margin) + margin, side + 2 * margin + caption), "white")
    draw = ImageDraw.Draw(canvas)
    positions = torch.arange(length)
    query_is_text = (positions < text_len)[:, None]
    key_is_text = (positions < text_len)[None, :]
    colours = torch.zeros(length, length, 3, dtype=torch.uint8)
    colours[...] = torch.tensor([240, 140, 30], dtype=torch.uint8)  # image -> image
    colours[(~query_is_text & key_is_text)] = torch.tensor([60, 110, 220], dtype=torch.uint8)
    colours[(query_is_text & key_is_text).expand(length, length)] = torch.tensor([150, 150, 150], dtype=torch.uint8)
    for index, pattern in enumerate(patterns):
        mask = build_mask(pattern, text_len, grid, kernel)
        pixels = (colours * mask[..., None]).numpy()
        panel = Image.fromarray(pixels, "RGB").resize((side, side), Image.NEAREST)
        left = margin + index * (side + margin)
        canvas.paste(panel, (left, margin + caption))
        draw.text((left, margin - 4), f"{pattern} (text {text_len}, grid {grid}x{grid})", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
