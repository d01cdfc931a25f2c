"""The transformer: shapes, losses, that each layer sees exactly its mask, attention
backends, caption dropout, save/load, and the paper's 12B configuration."""

from pathlib import Path

import pytest
import torch

from dalle.checkpoint import CheckpointError
from dalle.config import TransformerConfig, load_config
from dalle.errors import DalleError
from dalle.models.masks import PATTERNS, build_mask
from dalle.models.transformer import (
    DalleTransformer,
    drop_captions,
    empty_captions,
    load_transformer,
    padding_ids,
    parameter_count,
    save_transformer,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(**overrides) -> TransformerConfig:
    values = dict(dim=32, depth=2, heads=2, text_len=6, text_vocab=26, image_vocab=16, image_grid=4,
                  conv_kernel=3, attention=["paper"], caption_dropout=0.0)
    values.update(overrides)
    return TransformerConfig(**values)


def tiny_batch(config: TransformerConfig, batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_vocab, (batch, config.text_len), generator=generator)
    image = torch.randint(0, config.image_vocab, (batch, config.image_grid ** 2), generator=generator)
    return text, image


def test_forward_shapes_and_weighted_loss():
    config = tiny_config()
    torch.manual_seed(0)
    model = DalleTransformer(config)
    text, image = tiny_batch(config)
    out = model(text, image)
    assert out["logits_text"].shape == (3, config.text_len - 1, config.text_vocab)
    assert out["logits_image"].shape == (3, 16, config.image_vocab)
    expected = out["text_loss"] / 8 + out["image_loss"] * 7 / 8
    assert torch.allclose(out["loss"], expected)
    # The losses are the cross-entropies of the documented targets.
    text_ce = torch.nn.functional.cross_entropy(out["logits_text"].reshape(-1, config.text_vocab),
                                                text[:, 1:].reshape(-1))
    image_ce = torch.nn.functional.cross_entropy(out["logits_image"].reshape(-1, config.image_vocab),
                                                 image.reshape(-1))
    assert torch.allclose(out["text_loss"], text_ce) and torch.allclose(out["image_loss"], image_ce)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_prefix_forward_matches_full_forward():
    config = tiny_config()
    torch.manual_seed(0)
    model = DalleTransformer(config).eval()
    text, image = tiny_batch(config)
    full = model(text, image)["logits_image"]  # (B, 16, V)
    part = model(text, image[:, :5])["logits_image"]  # predicts tokens 0..5
    assert part.shape[1] == 6
    assert torch.allclose(part, full[:, :6], atol=1e-5)
    empty = model(text, image[:, :0])
    assert empty["logits_image"].shape[1] == 1 and float(empty["image_loss"]) == 0.0
    assert torch.allclose(model.prefill(text, image[:, :5]), full[:, 5], atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_layer_sees_exactly_its_mask(pattern):
    # With one layer, the output at stream position q depends on the input at k iff
    # mask[q, k]. Perturb each input position and see which outputs move.
    config = tiny_config(depth=1, attention=[pattern])
    torch.manual_seed(0)
    model = DalleTransformer(config).eval()
    text, image = tiny_batch(config, batch=1)
    length = config.text_len + 15
    x = model.embed(text, image[:, :15])  # (1, T, D)
    base = model.hidden(x)
    seen = torch.zeros(length, length, dtype=torch.bool)
    for k in range(length):
        moved = x.clone()
        moved[:, k] += torch.randn(config.dim)
        seen[:, k] = (model.hidden(moved) - base).abs().amax(dim=-1)[0] > 1e-6
    assert torch.equal(seen, build_mask(pattern, config.text_len, config.image_grid, 3)[:length, :length])


def test_paper_layout_in_model():
    model = DalleTransformer(tiny_config(depth=4))
    assert model.patterns == ["row", "row", "column", "conv"]


@pytest.mark.parametrize("attention", [["paper"], ["causal"], ["row"], ["column"], ["conv"]])
def test_flex_attention_equals_sdpa(attention):
    # FlexAttention runs eagerly (unfused) on CPU in torch 2.13, so both paths are
    # compared here; on CUDA the same block masks run compiled.
    config = tiny_config(depth=4, attention=attention)
    torch.manual_seed(0)
    model = DalleTransformer(config).eval()
    text, image = tiny_batch(config)
    with torch.no_grad():  # FlexAttention has no backward on CPU
        model.attention_backend = "sdpa"
        expected = model(text, image)
        model.attention_backend = "flex"
        got = model(text, image)
    for key in ("logits_text", "logits_image", "loss"):
        assert torch.allclose(got[key], expected[key], atol=1e-5), key


@pytest.mark.parametrize("grid,text_len,kernel", [(16, 24, 5), (8, 7, 3), (12, 5, 5), (4, 3, 3)])
def test_windowed_attention_equals_the_dense_mask_forward_and_backward(grid, text_len, kernel):
    """The CPU's windows (chunks of rows, column-major for column layers) give the dense
    mask's logits and gradients, on whole streams of N - 1 (training) and N tokens."""
    config = tiny_config(depth=4, attention=["row", "row", "column", "conv"], conv_kernel=kernel,
                         image_grid=grid, text_len=text_len, text_vocab=64 + text_len)
    torch.manual_seed(0)
    model = DalleTransformer(config)
    text = torch.randint(0, 64, (2, text_len))
    image = torch.randint(0, config.image_vocab, (2, grid * grid))
    results = {}
    for backend in ("sdpa", "windows"):
        model.attention_backend = backend
        model.zero_grad()
        out = model(text, image)
        out["loss"].backward()
        results[backend] = (out, model.blocks[0].attn.qkv.weight.grad.clone())
    (dense, dense_grad), (windows, windows_grad) = results["sdpa"], results["windows"]
    assert torch.allclose(windows["logits_image"], dense["logits_image"], atol=1e-5)
    assert torch.allclose(windows["loss"], dense["loss"], atol=1e-6)
    assert torch.allclose(windows_grad, dense_grad, atol=1e-6)
    used = {p: model._window_plans.get((i, "cpu")) is not None for i, p in enumerate(sorted(set(model.patterns)))}
    if grid == 16:
        assert all(used.values()), used  # every sparse pattern ran in windows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_attention_equals_sdpa_on_cuda():
    config = tiny_config(depth=4, image_grid=8, dim=64, heads=4)
    torch.manual_seed(0)
    model = DalleTransformer(config).cuda().eval()
    text, image = (t.cuda() for t in tiny_batch(config))
    model.attention_backend = "sdpa"
    expected = model(text, image)
    model.attention_backend = "flex"
    got = model(text, image)
    assert torch.allclose(got["logits_image"], expected["logits_image"], atol=1e-4)
    got["loss"].backward()  # compiled FlexAttention trains on CUDA
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_bad_inputs_are_one_line_errors():
    config = tiny_config()
    model = DalleTransformer(config)
    text, image = tiny_batch(config)
    with pytest.raises(DalleError):
        model(text[:, :3], image)
    with pytest.raises(DalleError):
        model(text, torch.zeros(3, 17, dtype=torch.long))
    model.attention_backend = "fast"
    with pytest.raises(DalleError):
        model(text, image)


def test_padding_and_drop_captions():
    config = tiny_config()
    assert padding_ids(26, 6).tolist() == [20, 21, 22, 23, 24, 25]
    assert empty_captions(2, 26, 6).tolist() == [[20, 21, 22, 23, 24, 25]] * 2
    text = torch.randint(0, 20, (400, config.text_len))
    original = text.clone()
    dropped = drop_captions(text, 0.25, torch.Generator().manual_seed(0), text_vocab=config.text_vocab)
    assert torch.equal(text, original)  # not in place
    is_empty = (dropped == padding_ids(26, 6)).all(dim=1)
    kept = (dropped == text).all(dim=1)
    assert bool((is_empty | kept).all())
    assert 60 < int(is_empty.sum()) < 140
    again = drop_captions(text, 0.25, torch.Generator().manual_seed(0), text_vocab=config.text_vocab)
    assert torch.equal(dropped, again)
    assert torch.equal(drop_captions(text, 0.0, text_vocab=26), text)
    assert bool((drop_captions(text, 1.0, text_vocab=26) == padding_ids(26, 6)).all())


def test_tied_embeddings_share_weights():
    model = DalleTransformer(tiny_config(tie_embeddings=True))
    assert model.text_head.weight is model.text_emb.weight
    assert model.image_head.weight is model.image_emb.weight
    untied = DalleTransformer(tiny_config())
    config = tiny_config()
    assert parameter_count(untied) - parameter_count(model) == (config.text_vocab + config.image_vocab) * config.dim


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    config = tiny_config(tie_embeddings=tie, attention=["row", "conv"])
    torch.manual_seed(0)
    model = DalleTransformer(config).eval()
    text, image = tiny_batch(config)
    expected = model(text, image)["logits_image"]
    save_transformer(model, tmp_path / "transformer")
    loaded = load_transformer(tmp_path / "transformer")
    assert loaded.config == config and not loaded.training
    assert torch.equal(loaded(text, image)["logits_image"], expected)
    if tie:
        assert loaded.text_head.weight is loaded.text_emb.weight
    with pytest.raises(CheckpointError):
        load_transformer(tmp_path / "missing")


def test_dalle_12b_config_on_meta_device():
    config = load_config(CONFIGS / "dalle-12b.yaml")
    t = config.transformer
    assert (t.depth, t.heads, t.dim, t.dim // t.heads) == (64, 62, 3968, 64)
    assert (t.text_len, t.text_vocab, t.image_vocab, t.image_grid) == (256, 16384 + 256, 8192, 32)
    assert config.tokenizer.text_len == t.text_len
    with torch.device("meta"):
        model = DalleTransformer(t)
    count = parameter_count(model)
    # 64 blocks of 12 d^2 + 13 d, embeddings and heads of both vocabularies, positions.
    d = t.dim
    blocks = 64 * (12 * d * d + 13 * d)
    vocab = 2 * (t.text_vocab + t.image_vocab) * d
    positions = (t.text_len + 2 * t.image_grid) * d
    assert count == blocks + vocab + positions + 2 * d
    assert 12.0e9 < count < 12.5e9
    assert model.patterns[-1] == "conv" and model.patterns.count("column") == 16
