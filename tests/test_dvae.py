"""The discrete VAE: shapes, gradients, losses that fall, schedules, save/load, metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle.checkpoint import CheckpointError
from dalle.config import ConfigError, DVAEConfig
from dalle.models.dvae import (
    DVAE,
    codebook_stats,
    decode,
    encode,
    kl_to_uniform,
    kl_weight_at,
    load_dvae,
    logit_laplace_nll,
    psnr,
    save_dvae,
    temperature_at,
    usage_deficit,
)


def tiny(**overrides) -> DVAEConfig:
    values = dict(image_size=16, hidden=16, blocks_per_group=1, groups=3, codebook_size=32, decoder_init=16)
    values.update(overrides)
    return DVAEConfig(**values)


def toy_images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Black pictures with one flat coloured rectangle each: (n, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 3, size, size)
    for i in range(n):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
        images[i, :, y : y + h, x : x + w] = torch.rand(3, 1, 1, generator=g)
    return images


@pytest.mark.parametrize("layout", ["openai", "light"])
def test_forward_shapes_and_gradients(layout):
    torch.manual_seed(0)
    model = DVAE(tiny(layout=layout))
    images = toy_images(4)
    out = model(images, temperature=1.0, kl_weight=6.6)
    assert out["logits"].shape == (4, 32, 4, 4)  # 3 groups: 16 / 2**2 = 4
    assert out["reconstruction"].shape == images.shape
    assert 0.0 <= out["reconstruction"].min() and out["reconstruction"].max() <= 1.0
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert 0.0 <= out["kl"].item() <= math.log(32) + 1e-5
    out["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    # Every encoder weight gets signal through the relaxed codes, not just the decoder's.
    assert model.encoder.input.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["openai", "light"])
def test_grid_size_follows_groups(layout):
    for groups, grid in ((1, 16), (2, 8), (4, 2)):
        if layout == "light" and groups == 1:
            with pytest.raises(ConfigError, match="dvae.groups"):
                tiny(groups=groups, layout=layout)
            continue
        config = tiny(groups=groups, layout=layout)
        assert config.grid_size == grid
        model = DVAE(config)
        assert encode(model, toy_images(2)).shape == (2, grid, grid)
        assert decode(model, torch.zeros(2, grid, grid, dtype=torch.long)).shape == (2, 3, 16, 16)


def test_light_layout_keeps_every_group_off_the_full_resolution():
    """The light layout's encoder sees the picture only through its 2x2 unshuffle stem, and every
    group is `hidden` wide, so it has fewer weights than OpenAI's at the same sizes."""
    light, openai = DVAE(tiny(layout="light")), DVAE(tiny(layout="openai"))
    assert light.encoder.input.in_channels == 12 and light.encoder.input.kernel_size == (3, 3)
    assert all(block.res_path.conv_4.out_channels == 16 for block in
               (group.block_1 for group in light.encoder.groups))
    assert light.decoder.output.conv.out_channels == 6 and light.decoder.output.conv.kernel_size == (3, 3)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(light) < count(openai)
    sides = {}
    for name, model in (("light", light), ("openai", openai)):
        model.encoder.groups[0].block_1.register_forward_hook(lambda m, i, o, name=name: sides.update({name: o.shape}))
        model(toy_images(2), temperature=1.0, kl_weight=0.0)
    assert sides == {"light": (2, 16, 8, 8), "openai": (2, 16, 16, 16)}  # the first group: half / full resolution


def test_files_saved_before_layouts_existed_load_as_openai(tmp_path):
    torch.manual_seed(0)
    model = DVAE(tiny(layout="openai")).eval()
    save_dvae(model, tmp_path / "dvae")
    meta_path = tmp_path / "dvae" / "config.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["layout"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_dvae(tmp_path / "dvae")
    assert loaded.config.layout == "openai"
    images = toy_images(2)
    assert torch.equal(encode(loaded, images), encode(model, images))


@pytest.mark.parametrize("loss,layout", [("logit_laplace", "openai"), ("mse", "openai"), ("mse", "light")])
def test_tiny_training_lowers_the_loss(loss, layout):
    torch.manual_seed(0)
    config = tiny(loss=loss, layout=layout)
    model = DVAE(config)
    images = toy_images(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        out = model(images, temperature=1.0, kl_weight=0.0)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["recon_loss"].item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.1 * abs(first), losses


def test_logit_laplace_nll_is_a_density():
    # Integrates to 1 over (0, 1) for any location and scale.
    x = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    for mu, log_scale in ((0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)):
        density = torch.exp(-logit_laplace_nll(x, torch.tensor(mu), torch.tensor(log_scale)))
        assert torch.trapezoid(density, x).item() == pytest.approx(1.0, abs=2e-3)


def test_kl_to_uniform():
    assert kl_to_uniform(torch.zeros(1, 8, 2, 2)).abs().max() < 1e-6  # uniform q: 0
    peaked = torch.full((1, 8, 1, 1), -1e4)
    peaked[0, 3] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(8), abs=1e-4)  # one-hot q: log K


def test_kl_to_uniform_gradient_matches_autograd_through_the_plain_formula():
    """The lean backward (log q and q recomputed, not saved) is the gradient of sum q log q."""
    logits = torch.randn(2, 16, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl_to_uniform, (logits,))
    weights = torch.rand(2, 3, 3, dtype=torch.float64)
    (kl_to_uniform(logits) * weights).sum().backward()
    lean = logits.grad.clone()
    logits.grad = None
    log_q = torch.log_softmax(logits, dim=1)
    ((log_q.exp() * log_q).sum(dim=1) * weights).sum().backward()
    assert torch.allclose(lean, logits.grad, atol=1e-12)


def test_schedules_ends_and_middle():
    config = DVAEConfig(temperature_start=1.0, temperature_end=1 / 16, temperature_steps=1000,
                        kl_weight_end=6.6, kl_warmup_steps=100)
    assert temperature_at(config, 0) == pytest.approx(1.0)
    assert temperature_at(config, 500) == pytest.approx((1 + 1 / 16) / 2)  # cosine: halfway at half time
    assert temperature_at(config, 1000) == pytest.approx(1 / 16)
    assert temperature_at(config, 10_000) == pytest.approx(1 / 16)  # held after the anneal
    assert temperature_at(config, 250) > (1 + 1 / 16) / 2 > temperature_at(config, 750)
    assert kl_weight_at(config, 0) == 0.0
    assert kl_weight_at(config, 50) == pytest.approx(3.3)
    assert kl_weight_at(config, 100) == pytest.approx(6.6)
    assert kl_weight_at(config, 5000) == pytest.approx(6.6)
    assert kl_weight_at(dataclasses.replace(config, kl_warmup_steps=0), 0) == pytest.approx(6.6)


def test_encode_decode_shapes_and_dtypes():
    model = DVAE(tiny()).eval()
    codes = encode(model, toy_images(3))
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 32
    pictures = decode(model, codes)
    assert pictures.shape == (3, 3, 16, 16) and pictures.dtype == torch.float32
    assert 0.0 <= pictures.min() and pictures.max() <= 1.0


def test_metrics():
    a = torch.rand(2, 3, 8, 8)
    assert psnr(a, a) == pytest.approx(100.0)
    assert psnr(a, (a + 0.1).clamp(0, 1)) > psnr(a, (a + 0.3).clamp(0, 1))
    assert psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)) == pytest.approx(20.0)
    stats = codebook_stats(torch.tensor([[0, 1], [2, 3]]), 8)
    assert stats["perplexity"] == pytest.approx(4.0)
    assert stats["used_fraction"] == 0.5 and stats["dead_codes"] == 4
    assert codebook_stats(torch.zeros(5, dtype=torch.int64), 8)["perplexity"] == pytest.approx(1.0)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DVAE(tiny()).eval()
    save_dvae(model, tmp_path / "dvae")
    loaded = load_dvae(tmp_path / "dvae")
    assert loaded.config == model.config and not loaded.training
    images = toy_images(2)
    codes = encode(model, images)
    assert torch.equal(encode(loaded, images), codes)
    assert torch.equal(decode(loaded, codes), decode(model, codes))


def test_mismatched_checkpoint_fails_with_one_line(tmp_path):
    save_dvae(DVAE(tiny()), tmp_path / "dvae")
    # Another codebook size written into the config: the weights no longer fit.
    meta_path = tmp_path / "dvae" / "config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["codebook_size"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="encoder.output.conv") as error:
        load_dvae(tmp_path / "dvae")
    assert "\n" not in str(error.value)

    # A missing weight.
    meta["config"]["codebook_size"] = 32
    meta_path.write_text(json.dumps(meta))
    weights = tmp_path / "dvae" / "model.safetensors"
    state = load_file(str(weights))
    del state["decoder.input.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="missing weight 'decoder.input.weight'") as error:
        load_dvae(tmp_path / "dvae")
    assert "\n" not in str(error.value)

    # Another kind of model, and no model at all.
    meta["kind"] = "clip"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected a 'dvae' model"):
        load_dvae(tmp_path / "dvae")
    with pytest.raises(CheckpointError, match="not found"):
        load_dvae(tmp_path / "nothing")


def test_straight_through_decodes_one_hot_codes_and_trains_the_encoder():
    torch.manual_seed(0)
    model = DVAE(tiny(straight_through=True, loss="mse"))
    seen = {}
    model.decoder.input.register_forward_hook(lambda module, inputs, output: seen.update(z=inputs[0].detach()))
    out = model(toy_images(2), temperature=0.5, kl_weight=1.0)
    z = seen["z"]  # (B, K, h, w)
    one_hot = torch.nn.functional.one_hot(z.argmax(1), 32).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(z, one_hot, atol=1e-6, rtol=0)  # hard codes forward (up to rounding)
    out["loss"].backward()
    assert model.encoder.input.weight.grad.abs().sum() > 0


def test_without_gumbel_noise_the_codes_are_the_encoders_own_argmax():
    torch.manual_seed(0)
    model = DVAE(tiny(straight_through=True, gumbel_noise=False, loss="mse"))
    seen = {}
    model.decoder.input.register_forward_hook(lambda module, inputs, output: seen.update(z=inputs[0].detach()))
    images = toy_images(2)
    first = model(images, temperature=1.0, kl_weight=0.0)
    z_first = seen["z"]
    second = model(images, temperature=1.0, kl_weight=0.0)
    torch.testing.assert_close(seen["z"], z_first)  # deterministic: no noise
    torch.testing.assert_close(first["loss"], second["loss"])
    assert torch.equal(seen["z"].argmax(1), encode(model, images))  # what decoding will see


def test_usage_deficit_is_zero_for_even_use_and_log_k_for_one_code():
    even = torch.zeros(2, 8, 2, 2)  # uniform over 8 codes in every cell
    assert usage_deficit(even).item() == pytest.approx(0.0, abs=1e-6)
    one = torch.full((2, 8, 2, 2), -1e4)
    one[:, 3] = 0.0  # every cell certain of code 3
    assert usage_deficit(one).item() == pytest.approx(math.log(8), abs=1e-4)
    spread = torch.full((1, 8, 2, 4), -1e4)  # 8 cells, each certain of a different code
    spread.view(1, 8, 8)[0, torch.arange(8), torch.arange(8)] = 0.0
    assert usage_deficit(spread).item() == pytest.approx(0.0, abs=1e-4)


def test_usage_term_adds_to_the_loss_and_has_gradients():
    torch.manual_seed(0)
    images = toy_images(4)
    plain = DVAE(tiny(loss="mse"))
    torch.manual_seed(1)
    plain_out = plain(images, temperature=1.0, kl_weight=0.0)
    with_usage = DVAE(tiny(loss="mse", usage_weight=0.5))
    with_usage.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    out = with_usage(images, temperature=1.0, kl_weight=0.0)
    expected = plain_out["loss"] + 0.5 * usage_deficit(out["logits"].detach())
    torch.testing.assert_close(out["loss"].detach(), expected.detach())
    out["loss"].backward()
    assert with_usage.encoder.output.conv.weight.grad.abs().sum() > 0


def test_shipped_config_builds():
    from dalle.config import load_config

    config = load_config("configs/dvae-shapes.yaml")
    model = DVAE(config.dvae)
    assert encode(model, torch.rand(1, 3, config.data.size, config.data.size)).shape == (
        1, config.dvae.grid_size, config.dvae.grid_size)
