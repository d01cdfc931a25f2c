"""CLIP: a text transformer and a small ViT (or CNN) trained to agree on which caption fits which picture.

Both towers end in a linear projection to `embed_dim` and an L2 normalisation, so a
caption and a picture are compared by cosine similarity times a learned scale (the
inverse temperature of the CLIP paper, initialised at 1/0.07 and clamped at 100).

Inputs follow the project's conventions:
- captions are (B, text_len) int64 blocks from the project tokenizer: BPE ids in [0, V),
  and padding at position i is the distinct id V + i, so `text_vocab = V + text_len`;
- pictures are float (B, 3, H, W) in [0, 1]; the model rescales them to [-1, 1] itself
  and resizes them to `image_size` when they come at another size (e.g. a dVAE's).

The text tower is bidirectional and ignores padding: pad positions are masked out as
attention keys and the caption embedding is the mean of the real tokens' outputs. Why not
the CLIP paper's causal mask and last-token pooling? The paper pools an end-of-text
token, which our block does not have (a full block ends on a real word), and per-position
padding makes "the last real token" depend on the caption's length in ways a mean over
real tokens does not. A caption with no real token (the empty string) falls back to
attending over and averaging its padding, so it still gets a finite embedding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from dalle.checkpoint import load_model, save_model
from dalle.config import CLIPConfig
from dalle.errors import DalleError

KIND = "clip"
MAX_LOGIT_SCALE = 100.0  # CLIP paper: the learned scale is clipped so training stays stable
MLP_RATIO = 4


class Block(nn.Module):
    """A pre-norm transformer block: self-attention then an MLP, both residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, MLP_RATIO * dim), nn.GELU(), nn.Linear(MLP_RATIO * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the block; `keep` (B, 1, 1, T) bool says which keys each query may attend to."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, h, T, d)
        x = x + self.proj(rearrange(attended, "b h t d -> b t (h d)"))  # (B, T, D)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Caption ids (B, text_len) -> unnormalised caption features (B, text_dim)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.text_len = config.text_len
        self.first_pad_id = config.text_vocab - config.text_len  # V: pad at position i is V + i
        self.token_embedding = nn.Embedding(config.text_vocab, config.text_dim)
        self.position_embedding = nn.Parameter(torch.randn(config.text_len, config.text_dim) * 0.01)
        self.blocks = nn.ModuleList(Block(config.text_dim, config.text_heads) for _ in range(config.text_depth))
        self.norm = nn.LayerNorm(config.text_dim)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        if text_ids.shape[0] == 0:
            return self.norm.weight.new_zeros(0, self.norm.weight.shape[0])
        real = text_ids < self.first_pad_id  # (B, T)
        empty = ~real.any(dim=1, keepdim=True)  # (B, 1): all padding, e.g. the empty caption
        real = real | empty  # such rows use their padding rather than dividing by zero
        # Columns after the batch's last real token are masked keys and never pooled, so
        # dropping them changes nothing but the cost (shapes captions fill ~10 of 24).
        used = int(real.any(dim=0).nonzero().max()) + 1
        text_ids, real = text_ids[:, :used], real[:, :used]  # (B, T')
        x = self.token_embedding(text_ids) + self.position_embedding[:used]  # (B, T', D)
        keep = rearrange(real, "b t -> b 1 1 t")
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)  # (B, T', D)
        weights = real.to(x.dtype).unsqueeze(-1)  # (B, T', 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1)  # (B, D)


class ImageEncoder(nn.Module):
    """A small ViT: pictures (B, 3, S, S) in [-1, 1] -> unnormalised features (B, vision_dim)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        grid = config.image_size // config.patch_size
        stem = config.vision_stem
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, padding=1), nn.GELU()) if stem else nn.Identity()
        self.patch_embedding = nn.Conv2d(stem or 3, config.vision_dim, config.patch_size, stride=config.patch_size)
        self.class_token = nn.Parameter(torch.randn(config.vision_dim) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(grid * grid + 1, config.vision_dim) * 0.01)
        self.norm_pre = nn.LayerNorm(config.vision_dim)
        self.blocks = nn.ModuleList(Block(config.vision_dim, config.vision_heads)
                                    for _ in range(config.vision_depth))
        self.norm_post = nn.LayerNorm(config.vision_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = rearrange(self.patch_embedding(self.stem(images)), "b d h w -> b (h w) d")  # (B, N, D)
        cls = repeat(self.class_token, "d -> b 1 d", b=patches.shape[0])  # (B, 1, D)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding  # (B, N + 1, D)
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm_post(x[:, 0])  # (B, D): the class token's output


class ConvImageEncoder(nn.Module):
    """A small CNN: pictures (B, 3, S, S) in [-1, 1] -> unnormalised features (B, vision_dim).

    A 3x3 convolution, then three stride-2 3x3 convolutions (each with a group norm and a
    GELU) down to S/8, pooled over the whole map by mean and max: the mean says how much
    of each feature there is (colour, area), the max whether a detector fired anywhere
    (a corner, an apex). Where things are still shows through the zero padding's effect
    on border features, though less sharply than with a ViT's position embeddings.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.conv_width
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.GELU(),
        )
        self.proj = nn.Linear(4 * width, config.vision_dim)
        self.norm = nn.LayerNorm(config.vision_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.layers(images)  # (B, 2w, S/8, S/8)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)  # (B, 4w)
        return self.norm(self.proj(pooled))  # (B, D)


class CLIP(nn.Module):
    """Contrastive text-image model; returns embeddings, logits and the contrastive loss."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config)
        self.vision = ConvImageEncoder(config) if config.vision_tower == "conv" else ImageEncoder(config)
        self.text_projection = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.image_projection = nn.Linear(config.vision_dim, config.embed_dim, bias=False)
        # The scale lives in log space (as in the paper) so it stays positive under SGD.
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.init_temperature)))
        self.apply(_init_weights)
        if config.vision_tower == "conv":  # He init: std 0.02 would shrink the signal through the stack
            for module in self.vision.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The inverse temperature exp(log scale), clamped at 100 (a 0-d tensor)."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Embeds captions.

        Args:
            text_ids: (B, text_len) int64 caption blocks from the project tokenizer.

        Returns:
            (B, embed_dim) L2-normalised caption embeddings.
        """
        self._check_text(text_ids)
        return F.normalize(self.text_projection(self.text(text_ids)), dim=-1)  # (B, E)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embeds pictures.

        Args:
            images: (B, 3, H, W) floats in [0, 1]; resized to `image_size` if H, W differ.

        Returns:
            (B, embed_dim) L2-normalised picture embeddings.
        """
        images = self._prepare_images(images)  # (B, 3, S, S) in [-1, 1]
        return F.normalize(self.image_projection(self.vision(images)), dim=-1)  # (B, E)

    def forward(self, text_ids: torch.Tensor, images: torch.Tensor, negative_ids: torch.Tensor | None = None,
                negative_images: torch.Tensor | None = None,
                negative_image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Scores every picture against every caption of the batch.

        Pair i (caption i, picture i) is the positive of row i. Captions that are
        identical token for token (frequent in small grammars such as `shapes`) are all
        positives of one another's pictures: the target spreads evenly over them, so the
        loss does not push apart pictures that fit the same words. With distinct
        captions this is exactly the CLIP paper's symmetric cross-entropy.

        Args:
            text_ids: (B, text_len) caption blocks.
            images: (B, 3, H, W) pictures in [0, 1], picture i described by caption i.
            negative_ids: optional (M, text_len) extra captions with no picture of their
                own (hard negatives such as `shapes.false_twin`): more columns for the
                picture-to-caption loss. One identical to a batch caption counts as a
                positive of that caption's pictures.
            negative_images: optional (M', 3, H, W) extra pictures with no caption of their
                own (hard negatives such as `twin_pictures.shape_twin`): more columns for the
                caption-to-picture loss.
            negative_image_ids: (M', text_len) the captions true of `negative_images`; a
                batch caption identical to one counts that picture as a positive.

        Returns:
            dict with `loss` (scalar), `logits_per_image` (B, B + M): [i, j] is the
            scaled cosine of picture i and caption j, and `logits_per_text` (B, B + M').
        """
        if text_ids.shape[0] != images.shape[0]:
            raise DalleError(f"CLIP got {text_ids.shape[0]} captions for {images.shape[0]} pictures")
        if (negative_images is None) != (negative_image_ids is None) or (
                negative_images is not None and negative_images.shape[0] != negative_image_ids.shape[0]):
            raise DalleError("CLIP needs negative_images and negative_image_ids together, one caption per picture")
        batch = text_ids.shape[0]
        all_ids = text_ids if negative_ids is None else torch.cat([text_ids, negative_ids])  # (B + M, L)
        text = self.encode_text(all_ids)  # (B + M, E)
        all_images = images if negative_images is None else torch.cat([images, negative_images])  # (B + M', 3, H, W)
        image = self.encode_image(all_images)  # (B + M', E)
        logits_per_image = self.logit_scale * image[:batch] @ text.t()  # (B, B + M)
        logits_per_text = logits_per_image[:, :batch].t()  # (B, B)
        if negative_images is not None:  # (B, B + M')
            logits_per_text = torch.cat([logits_per_text, self.logit_scale * text[:batch] @ image[batch:].t()], dim=1)
        def identical(ids: torch.Tensor) -> torch.Tensor:  # (B, n): caption i is token for token ids[j]
            return (text_ids[:, None, :] == ids[None, :, :]).all(dim=-1).to(logits_per_image.dtype)

        same = identical(all_ids)  # (B, B + M)
        image_targets = same / same.sum(dim=1, keepdim=True)  # rows sum to 1
        fits = same[:, :batch]  # (B, B), symmetric support
        if negative_image_ids is not None:
            fits = torch.cat([fits, identical(negative_image_ids)], dim=1)
        text_targets = fits / fits.sum(dim=1, keepdim=True)  # (B, B + M')
        loss = (F.cross_entropy(logits_per_image, image_targets) + F.cross_entropy(logits_per_text, text_targets)) / 2
        return {"loss": loss, "logits_per_image": logits_per_image, "logits_per_text": logits_per_text}

    def _check_text(self, text_ids: torch.Tensor) -> None:
        if text_ids.dim() != 2 or text_ids.shape[1] != self.config.text_len:
            raise DalleError(f"CLIP expects caption blocks of shape (B, {self.config.text_len}), "
                             f"got {tuple(text_ids.shape)}: was it trained with another tokenizer?")
        if not text_ids.numel():
            return
        low, high = int(text_ids.min()), int(text_ids.max())
        if low < 0 or high >= self.config.text_vocab:
            raise DalleError(f"caption ids must be in [0, {self.config.text_vocab}), got [{low}, {high}]: "
                             "was CLIP trained with another tokenizer?")

    def _prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise DalleError(f"CLIP expects pictures of shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.to(self.log_logit_scale.dtype)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return images * 2 - 1  # [0, 1] -> [-1, 1]


def _init_weights(module: nn.Module) -> None:
    # Small normal weights, as in CLIP and GPT-2; LayerNorm keeps its (1, 0) defaults.
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def save_clip(model: CLIP, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Saves a CLIP as a model directory (`config.json` + `model.safetensors`, kind "clip").

    Args:
        model: the CLIP to save.
        directory: the directory to (re)write atomically.
        extra: more JSON-able facts to keep in config.json (metrics, tokenizer name).
    """
    return save_model(model, model.config, directory, KIND, extra)


def load_clip(directory: str | Path, device: str | torch.device = "cpu") -> CLIP:
    """Loads a CLIP written by `save_clip`, in eval mode, on `device`.

    Raises:
        CheckpointError (a DalleError): the directory is missing, corrupt, or not a CLIP.
    """
    model, _ = load_model(directory, KIND, CLIPConfig, CLIP)
    return model.to(device)
