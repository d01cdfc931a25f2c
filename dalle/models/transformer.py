"""The DALL-E transformer: one decoder-only stream `[text block | image tokens]`.

The stream is exactly the paper's: `text_len` text tokens (BPE ids in `[0, V)`, and at
text position `i` the padding id `V + i`, so `text_vocab = V + text_len`) followed by the
`grid * grid` dVAE codes in raster order. There is no extra start token: like GPT, the
output at stream position `p` predicts the token at `p + 1`, so

- text positions `0 .. text_len - 2` predict text tokens `1 .. text_len - 1` (the first
  text token is the only token of the stream that is never predicted);
- the last text position predicts image token 0 (it has seen the whole caption, which
  is all the first image token can depend on);
- image token `a` predicts image token `a + 1`; the last image token is never an input.

dalle-pytorch instead prepends a start token, which also models the first caption token
at the price of one more position; the paper describes no such token, and nothing here
needs it because the caption is always given, never sampled.

Text and image tokens have their own embeddings and their own output heads (the joint
vocabulary of the paper, with each position restricted to the kind of token that comes
next). Positions: a learned embedding per text position; for image tokens a learned row
embedding plus a learned column embedding. Pre-norm blocks, GELU MLP, fused QKV. Each
layer has its own sparse attention pattern among image tokens (`dalle.masks`).

Attention runs through `F.scaled_dot_product_attention` with the dense boolean mask, or
through FlexAttention block masks on CUDA (`attention_backend`), which skip the blocks a
sparse mask leaves empty. Models return logits and losses; decoding loops live in
`dalle.sampling`, which drives `prefill` and `decode_step` with a `KVCache`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask

from dalle.checkpoint import load_model, save_model
from dalle.config import TransformerConfig
from dalle.errors import DalleError
from dalle.models.attention import Attention, KVCache
from dalle.models.masks import build_mask, flex_mask_mod, image_key_slice, layer_patterns, window_plan

KIND = "transformer"


def padding_ids(text_vocab: int, text_len: int, device=None) -> Tensor:
    """The padding id of every text position: `text_vocab - text_len + arange(text_len)`."""
    return torch.arange(text_vocab - text_len, text_vocab, device=device)  # (L,)


def empty_captions(batch: int, text_vocab: int, text_len: int, device=None) -> Tensor:
    """`batch` all-padding captions: the empty caption, and guidance's unconditional one."""
    return padding_ids(text_vocab, text_len, device).expand(batch, text_len).clone()  # (B, L)


def drop_captions(text: Tensor, p: float, generator: torch.Generator | None = None, *,
                  text_vocab: int) -> Tensor:
    """Caption dropout: each caption becomes the empty (all-padding) caption with probability p.

    Trains the unconditional model that classifier-free guidance needs. Returns a new
    tensor; `text` is not changed.

    Args:
        text: (B, L) token ids.
        p: the probability of dropping each caption.
        generator: the random source (on `text`'s device), for repeatable runs.
        text_vocab: the transformer's text vocabulary, `V + L`.
    """
    if p <= 0.0:
        return text.clone()
    batch, text_len = text.shape
    drop = torch.rand(batch, generator=generator, device=text.device) < p  # (B,)
    empty = padding_ids(text_vocab, text_len, text.device).to(text.dtype)  # (L,)
    return torch.where(drop[:, None], empty[None, :], text)  # (B, L)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_ratio * config.dim),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.dim, config.dim),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None = None,
                start: int = 0, block_mask=None, windows=None) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), mask, cache, start, block_mask, windows))  # (B, T, D)
        return x + self.dropout(self.mlp(self.ln2(x)))  # (B, T, D)

    def decode(self, x: Tensor, cache: tuple[Tensor, Tensor], start: int, sparse_keys: tuple) -> Tensor:
        """`forward` (in eval mode) for one decoded position with `Attention.decode`.

        Written with functional calls: at decoding sizes a step costs mostly per-call
        overhead, and module calls add to it.
        """
        ln1, ln2, fc1, fc2 = self.ln1, self.ln2, self.mlp[0], self.mlp[2]
        h = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)  # (B, 1, D)
        x = x + self.attn.decode(h, cache, start, *sparse_keys)
        h = F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        return x + F.linear(F.gelu(F.linear(h, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)  # (B, 1, D)

    def static_decode(self, x: Tensor, cache: tuple[Tensor, Tensor], where: Tensor, mask: Tensor) -> Tensor:
        """`forward` (in eval mode) for one position with `Attention.static_decode`."""
        x = x + self.attn.static_decode(self.ln1(x), cache, where, mask)
        return x + self.mlp(self.ln2(x))  # (B, 1, D)


class DalleTransformer(nn.Module):
    """The decoder-only transformer over `[text block | image tokens]` (see the module doc).

    Attributes:
        attention_backend: "auto" (FlexAttention on CUDA; on the CPU windows for the
            sparse patterns over a whole stream, SDPA with the dense mask otherwise),
            "sdpa", "flex" or "windows"; a runtime choice, not saved, that never changes
            the result.
        sparse_decode: True (default): `decode_step` reads from the cache only the keys
            each layer's pattern allows (text + one slice of image keys); False: the
            whole cache through the dense mask row. Same result; a runtime choice.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.text_len = config.text_len
        self.grid = config.image_grid
        self.image_len = config.image_grid ** 2
        self.max_len = self.text_len + self.image_len - 1  # the last image token is never an input
        self.patterns = layer_patterns(config.attention, config.depth)
        self.attention_backend = "auto"
        self.sparse_decode = True  # decode_step reads only the keys each layer's mask allows

        self.text_emb = nn.Embedding(config.text_vocab, config.dim)
        self.text_pos = nn.Parameter(torch.zeros(config.text_len, config.dim))
        self.image_emb = nn.Embedding(config.image_vocab, config.dim)
        self.image_row = nn.Parameter(torch.zeros(config.image_grid, config.dim))
        self.image_col = nn.Parameter(torch.zeros(config.image_grid, config.dim))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.ln_f = nn.LayerNorm(config.dim)
        self.text_head = nn.Linear(config.dim, config.text_vocab, bias=False)
        self.image_head = nn.Linear(config.dim, config.image_vocab, bias=False)
        if config.tie_embeddings:
            self.text_head.weight = self.text_emb.weight
            self.image_head.weight = self.image_emb.weight

        # One dense mask per distinct pattern, built once; layers index into the stack.
        # Not saved: they follow from the config.
        distinct = sorted(set(self.patterns))
        self.layer_mask = [distinct.index(pattern) for pattern in self.patterns]
        masks = torch.stack([build_mask(p, self.text_len, self.grid, config.conv_kernel) for p in distinct])
        self.register_buffer("masks", masks[:, :self.max_len, :self.max_len], persistent=False)  # (P, T, T)
        self._block_masks: dict = {}
        self._window_plans: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for parameter in (self.text_pos, self.image_row, self.image_col):
            nn.init.normal_(parameter, std=0.01)
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp[2].weight, std=residual_std)

    # ----- embeddings -----------------------------------------------------------------

    def image_positions(self) -> Tensor:
        """(N, D) the row + column embedding of every image token in raster order."""
        return (self.image_row[:, None, :] + self.image_col[None, :, :]).reshape(self.image_len, -1)

    def embed(self, text: Tensor, image: Tensor | None = None) -> Tensor:
        """(B, L + n, D) the embedded stream for a caption and the first n image tokens."""
        self._check_text(text)
        x = self.text_emb(text) + self.text_pos  # (B, L, D)
        if image is not None and image.shape[1] > 0:
            n = image.shape[1]
            if n > self.image_len:
                raise DalleError(f"got {n} image tokens, the model's grid holds {self.image_len}")
            image_x = self.image_emb(image) + self.image_positions()[:n]  # (B, n, D)
            x = torch.cat([x, image_x], dim=1)  # (B, L + n, D)
        return self.drop(x)

    def _check_text(self, text: Tensor) -> None:
        if text.dim() != 2 or text.shape[1] != self.text_len:
            raise DalleError(f"text must be (batch, {self.text_len}) token ids, got shape {tuple(text.shape)}")

    # ----- the stack --------------------------------------------------------------------

    def _use_flex(self, device: torch.device) -> bool:
        backend = self.attention_backend
        if backend not in ("auto", "sdpa", "flex", "windows"):
            raise DalleError(f"attention_backend must be auto, sdpa, flex or windows, got {backend!r}")
        return backend == "flex" or (backend == "auto" and device.type == "cuda")

    def _use_windows(self, device: torch.device, start: int, length: int) -> bool:
        """Windows serve a whole stream from position 0 (training, scoring), not a prefix."""
        backend = self.attention_backend
        whole = start == 0 and length >= self.text_len + self.image_len - 1
        return whole and (backend == "windows" or (backend == "auto" and device.type != "cuda"))

    def _window_plan(self, pattern_index: int, device: torch.device):
        key = (pattern_index, str(device))
        if key not in self._window_plans:
            pattern = sorted(set(self.patterns))[pattern_index]
            self._window_plans[key] = window_plan(pattern, self.text_len, self.grid, self.config.conv_kernel,
                                                  device=device)
        return self._window_plans[key]

    def _block_mask(self, pattern_index: int, length: int, device: torch.device):
        key = (pattern_index, length, str(device))
        if key not in self._block_masks:
            pattern = sorted(set(self.patterns))[pattern_index]
            mask_mod = flex_mask_mod(pattern, self.text_len, self.grid, self.config.conv_kernel)
            self._block_masks[key] = create_block_mask(mask_mod, None, None, length, length, device=device)
        return self._block_masks[key]

    def hidden(self, x: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        """Runs the blocks and the final norm over stream positions `start .. start + T - 1`.

        Args:
            x: (B, T, D) embedded tokens at those positions.
            cache: when given, every layer writes its keys and values there and attends to
                the cached positions before `start`.
            start: the stream position of `x[:, 0]` (> 0 only with a cache).
        """
        length = x.shape[1]
        end = start + length
        if end > self.max_len:
            raise DalleError(f"stream of {end} positions is longer than the model's {self.max_len}")
        use_flex = start == 0 and self._use_flex(x.device)
        use_windows = not use_flex and self._use_windows(x.device, start, length)
        for index, block in enumerate(self.blocks):
            pattern_index = self.layer_mask[index]
            layer_cache = cache.layer(index) if cache is not None else None
            plan = self._window_plan(pattern_index, x.device) if use_windows else None
            if use_flex:
                block_mask = self._block_mask(pattern_index, length, x.device)
                x = block(x, None, layer_cache, start, block_mask)
            elif plan is not None:
                x = block(x, None, layer_cache, start, windows=plan)
            else:
                mask = self.masks[pattern_index, start:end, :end]  # (T, start + T)
                x = block(x, mask, layer_cache, start)
        if cache is not None:
            cache.length = end
        return self.ln_f(x)  # (B, T, D)

    # ----- training ---------------------------------------------------------------------

    def forward(self, text: Tensor, image: Tensor) -> dict[str, Tensor]:
        """Logits and losses for a caption and image codes (or a prefix of them).

        Args:
            text: (B, L) caption ids (padding included).
            image: (B, n) image codes in raster order, 0 <= n <= N (N = grid**2).

        Returns:
            A dict with `logits_text` (B, L - 1, text_vocab) predicting text tokens 1..L-1;
            `logits_image` (B, min(n + 1, N), image_vocab) predicting image tokens 0..;
            `text_loss` and `image_loss` (mean cross-entropy over the tokens that have a
            target; image_loss is 0 when n == 0) and `loss`, their weighted sum
            (paper: 1/8 text, 7/8 image).
        """
        n = image.shape[1]
        if image.dim() != 2 or n > self.image_len:
            raise DalleError(f"image must be (batch, n <= {self.image_len}) codes, got shape {tuple(image.shape)}")
        inputs = image[:, :self.image_len - 1]  # the last image token predicts nothing
        h = self.hidden(self.embed(text, inputs))  # (B, L + min(n, N - 1), D)
        logits_text = self.text_head(h[:, :self.text_len - 1])  # (B, L - 1, Vt)
        logits_image = self.image_head(h[:, self.text_len - 1:])  # (B, min(n + 1, N), Vi)
        if self.text_len > 1:
            text_loss = F.cross_entropy(logits_text.flatten(0, 1).float(), text[:, 1:].flatten())
        else:  # a one-token text block has no text target
            text_loss = logits_text.new_zeros((), dtype=torch.float32)
        if n > 0:
            image_loss = F.cross_entropy(logits_image[:, :n].flatten(0, 1).float(), image.flatten())
        else:
            image_loss = logits_image.new_zeros((), dtype=torch.float32)
        loss = self.config.text_loss_weight * text_loss + self.config.image_loss_weight * image_loss
        return {"logits_text": logits_text, "logits_image": logits_image, "loss": loss,
                "text_loss": text_loss, "image_loss": image_loss}

    # ----- decoding steps (the loops are in dalle.sampling) ------------------------------

    def new_cache(self, batch: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache for `batch` rows and the whole stream."""
        weight = self.text_emb.weight
        return KVCache(self.config.depth, batch, self.config.heads, self.max_len,
                       self.config.dim // self.config.heads, device=device or weight.device,
                       dtype=dtype or weight.dtype)

    def prefill(self, text: Tensor, image: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """(B, image_vocab) logits of the next image token after a caption and image prefix.

        Runs the whole stream `[text | image]` (n < N image tokens); with a cache, fills
        it for those positions so that `decode_step` can continue from there.
        """
        h = self.hidden(self.embed(text, image), cache)  # (B, L + n, D)
        return self.image_head(h[:, -1])  # (B, Vi)

    def decode_step(self, token: Tensor, index: int, cache: KVCache) -> Tensor:
        """(B, image_vocab) logits of image token `index + 1`, given image token `index`.

        Args:
            token: (B,) the code of image token `index`.
            index: its raster index; the cache must hold every position before it.
            cache: filled by `prefill` and earlier steps; extended in place.
        """
        start = self.text_len + index
        if not 0 <= index < self.image_len - 1:
            raise DalleError(f"decode_step index must be in [0, {self.image_len - 1}), got {index}")
        if cache.length != start:
            raise DalleError(f"cache holds {cache.length} positions, decode_step({index}) needs {start}")
        position = self.image_row[index // self.grid] + self.image_col[index % self.grid]  # (D,), as in embed
        x = self.image_emb(token)[:, None, :] + position  # (B, 1, D)
        if self.sparse_decode:
            for layer, block in enumerate(self.blocks):
                x = block.decode(x, cache.layer(layer), start, self._sparse_keys(layer, index))
            cache.length = start + 1
            h = self.ln_f(x)  # (B, 1, D)
        else:
            h = self.hidden(x, cache, start)  # (B, 1, D)
        return self.image_head(h[:, 0])  # (B, Vi)

    def static_decode_step(self, token: Tensor, index: Tensor, keys_values: Tensor) -> Tensor:
        """`decode_step` with no shape or branch that depends on the step, for `torch.compile`.

        The index is a tensor, not a Python int, and each layer attends over the whole cache
        through its mask row (the unwritten slots are masked out), so one compiled graph, and
        on CUDA one captured CUDA graph, serves every step. It reads every cached key instead
        of only those the layer's pattern allows: on a GPU the saved Python and kernel-launch
        overhead is worth more than the skipped reads.

        Args:
            token: (B,) the code of image token `index`.
            index: () int64, its raster index; the cache must hold every position before it.
            keys_values: `KVCache.data`, (depth, 2, B, H, max_len, hd); the position
                `text_len + index` is written in place. The caller advances `KVCache.length`.
        """
        where = (index + self.text_len).view(1)  # (1,) the stream position
        index = index.view(1)  # index_select, not [index]: a tensor index must not become a Python int
        position = (self.image_row.index_select(0, index // self.grid)
                    + self.image_col.index_select(0, index % self.grid))  # (1, D), as in embed
        x = self.image_emb(token)[:, None, :] + position  # (B, 1, D)
        for layer, block in enumerate(self.blocks):
            mask = self.masks[self.layer_mask[layer]].index_select(0, where)  # (1, max_len)
            x = block.static_decode(x, (keys_values[layer, 0], keys_values[layer, 1]), where, mask)
        return self.image_head(self.ln_f(x)[:, 0])  # (B, Vi)

    def _sparse_keys(self, layer: int, index: int) -> tuple[int, slice, Tensor | None]:
        """What image query `index` reads in `layer`: the text, one slice of image keys."""
        image_slice, holes = image_key_slice(self.patterns[layer], index, self.grid, self.config.conv_kernel)
        text_len = self.text_len
        stream_slice = slice(text_len + image_slice.start, text_len + image_slice.stop, image_slice.step)
        allowed = self.masks[self.layer_mask[layer], text_len + index, stream_slice] if holes else None  # (n,)
        return text_len, stream_slice, allowed


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_transformer(model: DalleTransformer, directory: str | Path, extra: dict | None = None) -> Path:
    """Saves the transformer as a model directory (`config.json` + `model.safetensors`)."""
    return save_model(model, model.config, directory, KIND, extra)


def load_transformer(directory: str | Path, device=None) -> DalleTransformer:
    """Loads a transformer directory written by `save_transformer` (in eval mode)."""
    model, _ = load_model(directory, KIND, TransformerConfig, DalleTransformer)
    return model.to(device) if device is not None else model
