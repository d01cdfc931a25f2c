"""The VQGAN image tokenizer of taming-transformers (Esser et al., "Taming Transformers for
High-Resolution Image Synthesis", 2021), written here with the parameter names of its released
checkpoints, so that their state dicts load by name (`dalle convert vqgan`).

  pictures [0, 1] -> [-1, 1] -> Encoder -> quant_conv -> quantizer -> codes (B, h, w)
  codes -> codebook vectors -> post_quant_conv -> Decoder -> [-1, 1] -> pictures [0, 1]

Two quantizers, as taming has them: `VectorQuantizer` (its VQModel: the nearest codebook
vector, `quantize.embedding`) and `GumbelQuantize` (its GumbelVQ: a 1x1 convolution to code
logits, `quantize.proj`, and a codebook, `quantize.embed`). The discriminator and LPIPS of
taming's training are not here: `VQGAN.forward` is pixel MSE, an optional edge term and the
quantizer's loss, for the vq quantizer (`dalle train-vae` with `image_tokenizer: vqgan`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle.checkpoint import load_model, save_model
from dalle.config import VQGANConfig
from dalle.errors import DalleError

KIND = "vqgan"


# ----------------------------------------------------------------------------- building blocks


def group_norm(channels: int) -> nn.GroupNorm:
    """taming's `Normalize`: 32 groups, eps 1e-6."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus the input (1x1-projected when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)
        q, k, v = (layer(normed).reshape(b, 1, c, h * w).transpose(2, 3) for layer in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scaled by 1/sqrt(C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """A stride-2 3x3 convolution after padding one pixel right and below (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution: residual blocks (`block`), each followed by attention where `attn` has one;
    the encoder sets `downsample` on every level but the last, the decoder `upsample` on every
    level but the first."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """Residual block, attention, residual block, at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _level(c: VQGANConfig, block_in: int, block_out: int, blocks: int, side: int) -> Level:
    ins = [block_in] + [block_out] * (blocks - 1)
    attns = [AttnBlock(block_out) for _ in range(blocks)] if side in c.attn_resolutions else []
    return Level([ResnetBlock(i, block_out, c.dropout) for i in ins], attns)


class Encoder(nn.Module):
    """(B, in_channels, S, S) in [-1, 1] -> (B, z_channels, S / 2**(levels-1), same)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        levels, side, block_in = [], c.resolution, c.ch
        for i, mult in enumerate(c.ch_mult):
            level = _level(c, block_in, c.ch * mult, c.num_res_blocks, side)
            block_in = c.ch * mult
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                side //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = Middle(block_in, c.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, S, S)
        for i, level in enumerate(self.down):
            h = level(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, S, S), roughly in [-1, 1]."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        side = c.grid_size
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = Middle(block_in, c.dropout)
        levels: list[Level | None] = [None] * len(c.ch_mult)  # built lowest resolution first, kept in taming's order
        for i in reversed(range(len(c.ch_mult))):
            level = _level(c, block_in, c.ch * c.ch_mult[i], c.num_res_blocks + 1, side)
            block_in = c.ch * c.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
                side *= 2
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, S, S)


# ----------------------------------------------------------------------------- quantizers


class VectorQuantizer(nn.Module):
    """The nearest codebook vector (taming's VectorQuantizer, `legacy=True` loss)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> int64 (B, h, w): the index of the nearest codebook vector per cell."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # argmin of distances in float32
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (BHW, D)
            weight = self.embedding.weight.float()  # (K, D)
            distances = (flat**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * flat @ weight.t()  # (BHW, K)
        return distances.argmin(dim=1).view(b, h, w)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D): the codebook vectors."""
        return self.embedding.weight

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) -> (B, D, h, w) codebook vectors."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> (z_q with straight-through gradients, the quantizer loss, codes (B, h, w)).

        The loss is taming's legacy form: ||z - sg[e]||^2 + beta ||sg[z] - e||^2 (its beta sits
        on the codebook term, not the commitment term as in the VQ-VAE paper; kept so that the
        released models' recipe is the one trained here)."""
        codes = self.codes(z)
        z_q = self.embed_codes(codes).to(z.dtype)  # (B, D, h, w)
        loss = F.mse_loss(z_q.detach(), z) + self.beta * F.mse_loss(z_q, z.detach())
        return z + (z_q - z).detach(), loss, codes


class GumbelQuantize(nn.Module):
    """Code logits from a 1x1 convolution, and a codebook (taming's GumbelQuantize).

    taming samples `gumbel_softmax(hard=True)` even in eval mode, so its codes for a picture
    change from call to call; `codes` here takes the argmax of the logits, the mode of what
    it samples, so that a picture always gets the same codes."""

    def __init__(self, in_channels: int, embed_dim: int, n_embed: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> int64 (B, h, w): the likeliest code per cell."""
        return self.proj(z).argmax(dim=1)

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D): the codebook vectors."""
        return self.embed.weight

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) -> (B, D, h, w) codebook vectors."""
        return self.embed(codes).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- the model


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder. `forward` returns training losses; `encode` / `decode` map
    pictures in [0, 1] to codes and back (the `ImageTokenizer` interface)."""

    kind = KIND

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if config.quantizer == "vq":
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
        else:
            # taming sizes proj by z_channels though it reads quant_conv's output (so they are equal)
            self.quantize = GumbelQuantize(config.z_channels, config.embed_dim, config.n_embed)

    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def grid(self) -> int:
        return self.config.grid_size

    @property
    def image_size(self) -> int:
        return self.config.resolution

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [-1, 1] -> (B, embed_dim, h, w), what the quantizer reads."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) codebook vectors -> (B, out_ch, S, S), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) one-hot (or relaxed) codes -> pictures (B, C, S, S) in [0, 1], with gradients:
        the decoder reads the one-hot times the codebook. (`decode` looks the vectors up instead,
        which needs no (B, K, h, w) tensor.)"""
        z_q = torch.einsum("bkhw,kd->bdhw", one_hot, self.quantize.codebook)  # (B, D, h, w)
        return to_unit(self.decode_latents(z_q).float())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training pass: `losses` of the pictures' own latents."""
        return self.losses(images, self.latents(to_signed(images)))

    def losses(self, images: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training objective of pictures (B, C, S, S) in [0, 1] whose latents are z (B, D, h, w).

        Returns:
            `loss` (what to minimise), `recon_loss` (pixel MSE in [0, 1]), `vq_loss` (the
            quantizer's), `edge_loss` (MSE of horizontal and vertical pixel differences),
            `codes` (B, h, w) and `reconstruction` (B, C, S, S) in [0, 1], detached.
        """
        if not isinstance(self.quantize, VectorQuantizer):
            raise DalleError("VQGAN training implements the vq quantizer; a gumbel VQGAN is imported "
                             "(dalle convert vqgan), not trained here")
        z_q, vq_loss, codes = self.quantize(z)
        recon = (self.decode_latents(z_q).float() + 1) / 2  # (B, C, S, S), not clamped: the loss sees overshoot
        recon_loss = F.mse_loss(recon, images)
        edge_loss = edge_mse(recon, images)
        loss = recon_loss + vq_loss + self.config.edge_weight * edge_loss
        return {"loss": loss, "recon_loss": recon_loss.detach(), "vq_loss": vq_loss.detach(),
                "edge_loss": edge_loss.detach(), "codes": codes, "reconstruction": recon.detach().clamp(0, 1)}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures (B, C, S, S) in [0, 1] -> int64 codes (B, h, w)."""
        return encode(self, images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (B, h, w) -> pictures (B, C, S, S) in [0, 1]."""
        return decode(self, codes)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] (ours) -> [-1, 1] (taming's)."""
    return 2 * images - 1


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (taming's) -> [0, 1] (ours), clamped."""
    return ((x + 1) / 2).clamp(0.0, 1.0)


def edge_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE of the horizontal plus that of the vertical neighbour differences of two picture batches."""
    dx = F.mse_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
    dy = F.mse_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :])
    return dx + dy


# ----------------------------------------------------------------------------- codes <-> pictures


@torch.no_grad()
def encode(model: VQGAN, images: torch.Tensor) -> torch.Tensor:
    """Pictures -> codes: float (B, C, S, S) in [0, 1] -> int64 (B, h, w)."""
    device = next(model.parameters()).device
    x = to_signed(images.to(device=device, dtype=torch.float32))
    return model.quantize.codes(model.latents(x))  # (B, h, w)


@torch.no_grad()
def decode(model: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """Codes -> pictures: int64 (B, h, w) -> float (B, C, S, S) in [0, 1]."""
    device = next(model.parameters()).device
    z_q = model.quantize.embed_codes(codes.to(device))  # (B, D, h, w)
    return to_unit(model.decode_latents(z_q).float())


# ----------------------------------------------------------------------------- save / load


def save_vqgan(model: VQGAN, directory: str | Path, extra: dict | None = None) -> Path:
    """Writes `directory/config.json` + `model.safetensors` (kind "vqgan")."""
    return save_model(model, model.config, directory, KIND, extra=extra)


def load_vqgan(directory: str | Path) -> VQGAN:
    """Loads a VQGAN directory in eval mode; a mismatched one fails with one line (CheckpointError)."""
    model, _ = load_model(directory, KIND, VQGANConfig, VQGAN)
    return model
