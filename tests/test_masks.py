"""The attention masks: the fast builder against a slow position-by-position reference."""

import pytest
import torch

from dalle.errors import DalleError
from dalle.models.masks import (
    PATTERNS,
    allowed,
    build_mask,
    image_key_slice,
    layer_patterns,
    reference_mask,
    save_masks_png,
    window_plan,
)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("grid", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("kernel", [1, 3, 5, 11])
def test_build_mask_equals_reference(pattern, grid, kernel):
    assert torch.equal(build_mask(pattern, 5, grid, kernel), reference_mask(pattern, 5, grid, kernel))


def test_paper_grid_and_kernel_equal_reference():
    # The paper's own sizes for the image part (32x32 grid, 11x11 conv), short text block.
    for pattern in PATTERNS:
        assert torch.equal(build_mask(pattern, 2, 32, 11), reference_mask(pattern, 2, 32, 11)), pattern


@pytest.mark.parametrize("pattern", PATTERNS)
def test_shared_rules(pattern):
    text_len, grid = 6, 4
    mask = build_mask(pattern, text_len, grid, 3)
    length = text_len + grid * grid
    assert mask.shape == (length, length)
    assert not mask.triu(1).any()  # causal
    assert mask.diagonal().all()  # every position sees itself
    assert torch.equal(mask[:text_len, :text_len], torch.ones(text_len, text_len, dtype=torch.bool).tril())
    assert mask[text_len:, :text_len].all()  # every image token sees all the text


def test_paper_figure_11_rows():
    # Figure 11 of the paper: text 6, 4x4 grid; row attention sees the previous 5 image
    # tokens (itself included), the oldest being the same column one row up.
    text_len, grid = 6, 4
    row = build_mask("row", text_len, grid)[text_len:, text_len:]
    assert row[10].nonzero().flatten().tolist() == [6, 7, 8, 9, 10]
    column = build_mask("column", text_len, grid)[text_len:, text_len:]
    assert column[13].nonzero().flatten().tolist() == [1, 5, 9, 13]
    conv = build_mask("conv", text_len, grid, 3)[text_len:, text_len:]
    # 3x3 causal window with wraparound: up-left, up, up-right, left, itself.
    assert conv[9].nonzero().flatten().tolist() == [4, 5, 6, 8, 9]
    assert conv[8].nonzero().flatten().tolist() == [3, 4, 5, 7, 8]  # column 0 wraps to the row above


def test_allowed_is_elementwise_on_scalars():
    q, k = torch.tensor(20), torch.tensor(9)
    assert bool(allowed(q, k, "conv", 6, 4, 3)) == bool(reference_mask("conv", 6, 4, 3)[20, 9])


def test_layer_patterns_paper_layout():
    assert layer_patterns(["paper"], 8) == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    patterns = layer_patterns(["paper"], 64)
    assert patterns[-1] == "conv"
    assert [i for i, p in enumerate(patterns) if p == "column"] == list(range(2, 63, 4))
    assert layer_patterns(["paper"], 1) == ["conv"]
    assert layer_patterns(["row", "column"], 3) == ["row", "column", "row"]
    with pytest.raises(DalleError):
        layer_patterns(["paper", "row"], 4)
    with pytest.raises(DalleError):
        layer_patterns(["diagonal"], 4)


def test_save_masks_png(tmp_path):
    from PIL import Image

    path = save_masks_png(tmp_path / "masks.png", list(PATTERNS), text_len=6, grid=4, kernel=3, scale=3)
    image = Image.open(path)
    assert image.mode == "RGB" and image.width > 4 * 22 * 3


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("grid,kernel", [(4, 3), (5, 3), (8, 5), (3, 11), (16, 11)])
def test_image_key_slice_covers_exactly_the_mask(pattern, grid, kernel):
    # Decoding reads one slice of image keys; it must contain every allowed key, and
    # anything else in it must be flagged as a hole (so the mask row is applied).
    mask = build_mask(pattern, 0, grid, kernel)
    for index in range(grid * grid):
        keys, holes = image_key_slice(pattern, index, grid, kernel)
        inside = torch.zeros(grid * grid, dtype=torch.bool)
        inside[keys] = True
        assert not (mask[index] & ~inside).any(), (index, keys)
        if not holes:
            assert torch.equal(mask[index], inside), (index, keys)
        assert keys.stop == index + 1


@pytest.mark.parametrize("pattern", ["row", "column", "conv"])
def test_window_plans_cover_exactly_the_dense_mask(pattern):
    """Scattered back to stream positions, a plan's windows allow exactly the mask's image keys."""
    text_len, grid, kernel = 5, 16, 5
    plan = window_plan(pattern, text_len, grid, kernel)
    dense = build_mask(pattern, text_len, grid, kernel)
    chunks, chunk, width = plan.mask.shape
    order = plan.order if plan.order is not None else torch.arange(grid * grid)
    rebuilt = torch.zeros_like(dense)
    rebuilt[:text_len] = dense[:text_len]
    for c in range(chunks):
        for j in range(chunk):
            query = text_len + order[c * chunk + j]
            rebuilt[query, :text_len] = plan.mask[c, j, :text_len]
            for m in range(width - text_len):
                slot = (c - plan.back) * chunk + m
                if slot >= 0 and plan.mask[c, j, text_len + m]:
                    rebuilt[query, text_len + order[slot]] = True
    assert torch.equal(rebuilt, dense)
    assert width < text_len + grid * grid  # fewer keys per query than the whole stream


def test_window_plans_are_skipped_where_they_save_nothing():
    assert window_plan("causal", 5, 16) is None
    assert window_plan("row", 5, 4) is None  # a window would hold half the image
