"""The discrete VAE of DALL-E: pictures <-> grids of codebook indices.

The architecture is that of OpenAI's released dVAE (PyPI `dall-e` 0.1), generalised to
any number of groups:

- Encoder: a 7x7 convolution, then `groups` groups of bottleneck residual blocks (group g
  is `hidden * 2**g` channels wide) with a 2x max-pool after every group but the last,
  then ReLU and a 1x1 convolution to `codebook_size` logits per grid cell.
- Decoder: a 1x1 convolution from the (relaxed) one-hot codes to `decoder_init`
  channels, the groups in reverse width order with 2x nearest upsampling after every
  group but the last, then ReLU and a 1x1 convolution to 2 numbers per colour channel:
  the location and log-scale of a logit-Laplace distribution.
- Every residual block adds its residual path scaled by 1 / n_layers**2 (n_layers =
  groups * blocks_per_group) to its identity path, so a deep stack starts close to the
  identity and trains without normalisation layers.

`layout: light` (the default; `openai` is the released layout) keeps these blocks but moves every group off
the full resolution: the encoder starts with a 2x2 pixel-unshuffle and a 3x3 convolution,
its first group runs at half resolution without a pool after it, every group is `hidden`
wide; the decoder mirrors it, upsampling after its last group instead of its next-to-last,
and ends with a 3x3 convolution, its only layer at full resolution. Same grid, a fraction
of the multiply-adds at 64 px.

Training follows the paper (Ramesh et al. 2021, appendix A.2): the codes are relaxed with
Gumbel-softmax at a temperature annealed from 1 to 1/16, the KL to the uniform prior over
the codebook is weighted by a beta that rises from 0 to 6.6, and the reconstruction term
is the logit-Laplace likelihood of the pixels squeezed into [eps, 1 - eps].

Images everywhere in this module are float (B, C, H, W) in [0, 1]; the squeeze into
[eps, 1 - eps] (OpenAI's `map_pixels`) happens inside, so that weights converted from
OpenAI's files see exactly the inputs they were trained on.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle.checkpoint import load_model, save_model
from dalle.config import DVAEConfig

KIND = "dvae"


# ----------------------------------------------------------------------------- layers


def conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    """A 'same' convolution initialised as OpenAI's: N(0, 1/fan_in) weights, zero bias."""
    layer = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    nn.init.normal_(layer.weight, std=1.0 / math.sqrt(n_in * kernel**2))
    nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """A bottleneck residual block: id(x) + (1 / n_layers**2) * res(x).

    The residual path is four ReLU-convolutions through n_out / 4 channels. The encoder's
    kernels are 3, 3, 3, 1 and the decoder's 1, 3, 3, 3 (as in OpenAI's dVAE).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"block width {n_out} must be divisible by 4")
        n_hid = n_out // 4
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        self.post_gain = 1.0 / n_layers**2
        self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, kernel in enumerate(kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = conv(widths[i], widths[i + 1], kernel)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """Pixels (squeezed into [eps, 1 - eps]) -> code logits (B, codebook_size, h, w)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        c = config
        n_layers = c.groups * c.blocks_per_group
        self.light = c.layout == "light"
        self.input = conv(4 * c.channels, c.hidden, 3) if self.light else conv(c.channels, c.hidden, 7)
        groups = []
        width = c.hidden
        for g in range(c.groups):
            out = c.hidden if self.light else c.hidden * 2**g
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(c.blocks_per_group):
                layers[f"block_{i + 1}"] = ResidualBlock(width if i == 0 else out, out, n_layers, (3, 3, 3, 1))
            if g < c.groups - 1 and not (self.light and g == 0):  # light: the stem did the first 2x
                layers["pool"] = nn.MaxPool2d(kernel_size=2)
            groups.append(nn.Sequential(layers))
            width = out
        self.groups = nn.ModuleList(groups)
        self.output = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=conv(width, c.codebook_size, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.light:
            x = F.pixel_unshuffle(x, 2)  # (B, 4C, H / 2, W / 2)
        x = self.input(x)  # (B, hidden, H, W), or H / 2 x W / 2 (light)
        for group in self.groups:
            x = group(x)  # openai: (B, hidden * 2**g, H / 2**g, W / 2**g)
        return self.output(x)  # (B, K, h, w)


class Decoder(nn.Module):
    """(Relaxed) one-hot codes (B, codebook_size, h, w) -> logit-Laplace stats (B, 2C, H, W)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        c = config
        n_layers = c.groups * c.blocks_per_group
        self.light = c.layout == "light"
        self.input = conv(c.codebook_size, c.decoder_init, 1)
        groups = []
        width = c.decoder_init
        for g in range(c.groups):
            out = c.hidden if self.light else c.hidden * 2 ** (c.groups - 1 - g)
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(c.blocks_per_group):
                layers[f"block_{i + 1}"] = ResidualBlock(width if i == 0 else out, out, n_layers, (1, 3, 3, 3))
            # openai: after every group but the last; light: after the last one instead of the
            # next-to-last (undoing the encoder's stem at the end).
            if g < c.groups - 2 or g == (c.groups - 1 if self.light else c.groups - 2):
                layers["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            groups.append(nn.Sequential(layers))
            width = out
        self.groups = nn.ModuleList(groups)
        head = conv(width, 2 * c.channels, 3 if self.light else 1)  # light: 3x3, the only full-resolution layer
        # light: the ReLU overwrites the upsampled map (nothing else reads it), one full-resolution copy less
        self.output = nn.Sequential(OrderedDict(relu=nn.ReLU(inplace=self.light), conv=head))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.input(z)  # (B, decoder_init, h, w)
        for group in self.groups:
            x = group(x)
        return self.output(x)  # (B, 2C, H, W): location, then log-scale, per channel


# ----------------------------------------------------------------------------- the model


class DVAE(nn.Module):
    """Encoder + decoder + the paper's training objective. Returns losses, not pictures; `encode`
    and `decode` map pictures in [0, 1] to codes and back (the `ImageTokenizer` interface)."""

    kind = KIND

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid(self) -> int:
        return self.config.grid_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures (B, C, H, W) in [0, 1] -> int64 codes (B, h, w) (the module's `encode`)."""
        return encode(self, images)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 codes (B, h, w) -> pictures (B, C, H, W) in [0, 1] (the module's `decode`)."""
        return decode(self, codes)

    def decode_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) one-hot (or relaxed) codes -> pictures (B, C, H, W) in [0, 1], with gradients
        (the sigmoid of the decoder's location)."""
        mu = self.decoder(one_hot)[:, : self.config.channels].float()  # (B, C, H, W)
        return unsqueeze_pixels(torch.sigmoid(mu), self.config.eps)

    def forward(self, images: torch.Tensor, temperature: float, kl_weight: float) -> dict[str, torch.Tensor]:
        """One training (or validation) pass through the relaxed codes.

        Args:
            images: float (B, C, H, W) in [0, 1].
            temperature: the Gumbel-softmax temperature (see `temperature_at`).
            kl_weight: beta, the weight of the KL to the uniform prior (see `kl_weight_at`).

        Returns:
            A dict with `loss` (what to minimise), `recon_loss` (per pixel value: the
            logit-Laplace negative log-likelihood in nats, or the MSE), `kl` (nats per grid
            cell), `logits` (B, K, h, w), `reconstruction` (B, C, H, W) in [0, 1] decoded
            from the relaxed codes, detached.
        """
        c = self.config
        target = squeeze_pixels(images, c.eps)  # (B, C, H, W) in [eps, 1 - eps]
        logits = self.encoder(target).float()  # (B, K, h, w); float32 even under autocast
        if c.gumbel_noise:
            codes = gumbel_softmax(logits, temperature)  # (B, K, h, w), sums to 1 over K
        else:
            codes = torch.softmax(logits / temperature, dim=1)  # (B, K, h, w), sums to 1 over K
        if c.straight_through:  # forward the one-hot of the sample, backward through the relaxation
            hard = F.one_hot(codes.argmax(dim=1), c.codebook_size).permute(0, 3, 1, 2).to(codes.dtype)
            codes = hard + codes - codes.detach()
        stats = self.decoder(codes).float()  # (B, 2C, H, W)
        mu, log_scale = stats[:, : c.channels], stats[:, c.channels :]

        if c.loss == "logit_laplace":
            recon_loss = logit_laplace_nll(target, mu, log_scale).mean()
        else:  # mse: the location through a sigmoid is the picture; the log-scales go unused
            recon_loss = F.mse_loss(torch.sigmoid(mu), target)

        kl = kl_to_uniform(logits)  # (B, h, w)
        # The paper's beta-ELB is summed over an image: recon over C*H*W pixel values, KL
        # over h*w grid cells. Dividing both by C*H*W keeps the loss per pixel value and
        # leaves beta's meaning as in the paper.
        cells_per_value = logits.shape[2] * logits.shape[3] / images[0].numel()
        loss = recon_loss + kl_weight * cells_per_value * kl.mean()
        if c.usage_weight:
            loss = loss + c.usage_weight * usage_deficit(logits)
        return {
            "loss": loss,
            "recon_loss": recon_loss.detach(),
            "kl": kl.mean().detach(),
            "logits": logits,
            "reconstruction": unsqueeze_pixels(torch.sigmoid(mu.detach()), c.eps),
        }


def squeeze_pixels(images: torch.Tensor, eps: float) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps] (OpenAI's `map_pixels`), so the logits stay finite."""
    return (1 - 2 * eps) * images + eps


def unsqueeze_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[eps, 1 - eps] -> [0, 1], clamped (OpenAI's `unmap_pixels`)."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def logit_laplace_nll(x: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Per-value negative log-likelihood of x in (0, 1) under logit-Laplace(mu, exp(log_scale)).

    The density is exp(-|logit(x) - mu| / b) / (2 b x (1 - x)): a Laplace distribution
    on logit(x), carried back to (0, 1).
    """
    logit_x = torch.log(x) - torch.log1p(-x)
    return (logit_x - mu).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0) + torch.log(x * (1 - x))


def gumbel_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / temperature) over the codebook axis (dim 1)."""
    # In place: one (B, K, h, w) temporary for the noise instead of five.
    gumbel = torch.rand_like(logits).clamp_(1e-9, 1.0 - 1e-9).log_().neg_().log_().neg_()
    return torch.softmax(gumbel.add_(logits).div_(temperature), dim=1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform over K) per grid cell, in nats: sum q log q + log K. (B, K, h, w) -> (B, h, w)."""
    return _KLToUniform.apply(logits)


class _KLToUniform(torch.autograd.Function):
    """`kl_to_uniform` keeping only the logits for backward (alive anyway) instead of log q and q,
    two more (B, K, h, w) tensors; backward recomputes them. The gradient is
    q * (log q - sum q log q) over the codebook axis."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        log_q = torch.log_softmax(logits, dim=1)
        return (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradient is computed in place
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        log_q = torch.log_softmax(logits, dim=1)
        q = log_q.exp()
        neg_entropy = (q * log_q).sum(dim=1, keepdim=True)  # (B, 1, h, w)
        return q.mul_(log_q.sub_(neg_entropy)).mul_(grad[:, None])


def usage_deficit(logits: torch.Tensor) -> torch.Tensor:
    """log K - H(p), p the code distribution averaged over every cell of the batch: 0 when the
    batch uses all K codes equally, log K when it uses one. (B, K, h, w) -> scalar, in nats."""
    mean_q = torch.softmax(logits, dim=1).mean(dim=(0, 2, 3))  # (K,)
    entropy = -(mean_q * torch.log(mean_q.clamp_min(1e-12))).sum()
    return math.log(logits.shape[1]) - entropy


# ----------------------------------------------------------------------------- schedules


def _cosine_ramp(step: int, steps: int) -> float:
    """0 at step 0, 1 at `steps` and after, along half a cosine."""
    if steps <= 0:
        return 1.0
    progress = min(max(step, 0) / steps, 1.0)
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def temperature_at(config: DVAEConfig, step: int) -> float:
    """Gumbel-softmax temperature: cosine anneal from temperature_start to temperature_end
    over temperature_steps, then constant (paper: 1 -> 1/16 over 150k updates, cosine)."""
    ramp = _cosine_ramp(step, config.temperature_steps)
    return config.temperature_start + (config.temperature_end - config.temperature_start) * ramp


def kl_weight_at(config: DVAEConfig, step: int) -> float:
    """KL weight beta: cosine rise from 0 to kl_weight_end over kl_warmup_steps
    (paper: 0 -> 6.6 over the first 5,000 updates)."""
    return config.kl_weight_end * _cosine_ramp(step, config.kl_warmup_steps)


# ----------------------------------------------------------------------------- codes <-> pictures


@torch.no_grad()
def encode(model: DVAE, images: torch.Tensor) -> torch.Tensor:
    """Pictures -> codes: float (B, C, H, W) in [0, 1] -> int64 (B, h, w), the argmax code per cell."""
    device = next(model.parameters()).device
    x = squeeze_pixels(images.to(device=device, dtype=torch.float32), model.config.eps)
    return model.encoder(x).argmax(dim=1)  # (B, h, w)


@torch.no_grad()
def decode(model: DVAE, codes: torch.Tensor) -> torch.Tensor:
    """Codes -> pictures: int64 (B, h, w) -> float (B, C, H, W) in [0, 1] (the sigmoid of the location)."""
    device = next(model.parameters()).device
    one_hot = F.one_hot(codes.to(device), model.config.codebook_size)  # (B, h, w, K)
    return model.decode_one_hot(one_hot.permute(0, 3, 1, 2).float())  # (B, C, H, W)


# ----------------------------------------------------------------------------- metrics


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two picture batches in [0, 1], from the MSE over the whole batch.

    One MSE for the batch (not a mean of per-picture PSNRs, which a few near-perfect
    pictures would inflate) is the stricter of the two usual definitions.
    """
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10.0 * math.log10(1.0 / max(mse, 1e-10))


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How well a batch of codes uses the codebook.

    Returns:
        `perplexity`: exp of the entropy of the code histogram (codebook_size at best),
        `used_fraction`: share of codes that occur at least once,
        `dead_codes`: how many never occur.
    """
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum().item())
    return {"perplexity": math.exp(entropy), "used_fraction": used / codebook_size, "dead_codes": codebook_size - used}


# ----------------------------------------------------------------------------- save / load


def save_dvae(model: DVAE, directory: str | Path, extra: dict | None = None) -> Path:
    """Writes `directory/config.json` + `model.safetensors` (kind "dvae")."""
    return save_model(model, model.config, directory, KIND, extra=extra)


def load_dvae(directory: str | Path) -> DVAE:
    """Loads a dVAE directory in eval mode; a mismatched one fails with one line (CheckpointError)."""
    model, _ = load_model(directory, KIND, DVAEConfig, DVAE, legacy={"layout": "openai"})  # saved before layouts
    return model
