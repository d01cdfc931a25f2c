"""Attention for the DALL-E transformer: the layer, its key/value cache, and two fast paths.

- `Attention.forward`: a whole stream (training, prefill) through
  `F.scaled_dot_product_attention` with a dense boolean mask, FlexAttention with a
  block mask (which skips the blocks a sparse pattern leaves empty; compiled on a GPU),
  or windows (`windowed_attention`: the CPU's way of skipping them, a row query scoring
  text + two image rows instead of the whole stream);
- `Attention.decode`: one new position that reads only the keys its pattern allows
  (decoding is bound by memory reads, not arithmetic);
- `Attention.static_decode`: one position with fixed shapes, for `torch.compile` and
  CUDA graphs.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from dalle.config import TransformerConfig
from dalle.models.masks import WindowPlan


class KVCache:
    """Preallocated keys and values of every layer, for `max_len` stream positions.

    One allocation, `(depth, 2, batch, heads, max_len, head_dim)`, written in place by
    `DalleTransformer.prefill` and `decode_step`; `length` is how many positions are filled.
    """

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype: torch.dtype = torch.float32):
        # Zeros, not garbage: `static_decode_step` multiplies the unwritten slots by an
        # attention weight of 0, and 0 * NaN would be NaN.
        self.data = torch.zeros(depth, 2, batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.length = 0

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """The (keys, values) buffers of one layer, each (B, H, max_len, head_dim)."""
        return self.data[index, 0], self.data[index, 1]


class Attention(nn.Module):
    """Multi-head self-attention with fused QKV, optionally reading and writing a KV cache."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.dim // config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: Tensor, mask: Tensor | None, cache: tuple[Tensor, Tensor] | None = None,
                start: int = 0, block_mask=None, windows: WindowPlan | None = None) -> Tensor:
        """Attends the queries at stream positions `start .. start + T - 1`.

        Args:
            x: (B, T, D) the hidden states at those positions.
            mask: (T, start + T) boolean, True = attend (ignored when `block_mask` is given).
            cache: this layer's (keys, values) buffers; the new keys and values are written
                at `start ..` and the queries attend to everything cached up to them.
            start: the stream position of `x[:, 0]`.
            block_mask: a FlexAttention BlockMask for the whole (T, T) stream (start = 0);
                FlexAttention applies no attention dropout (residual dropout still applies).
            windows: the layer's WindowPlan, for a stream from position 0 holding the text
                block and N - 1 or N image tokens (used instead of `mask`).
        """
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if cache is not None:
            keys, values = cache
            keys[:, :, start:start + length] = k
            values[:, :, start:start + length] = v
            if start > 0:  # from position 0 the fresh keys are the whole story
                k = keys[:, :, :start + length]  # (B, H, start + T, hd)
                v = values[:, :, :start + length]
        dropout = self.dropout if self.training else 0.0
        if block_mask is not None:
            out = _flex_attention(q, k, v, block_mask)  # (B, H, T, hd)
        elif windows is not None:
            out = windowed_attention(q, k, v, windows, dropout)  # (B, H, T, hd)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(batch, length, dim)  # (B, T, D)
        return self.proj(out)

    def decode(self, x: Tensor, cache: tuple[Tensor, Tensor], start: int, text_len: int, image_slice: slice,
               allowed: Tensor | None) -> Tensor:
        """`forward` for one decoded position that reads only the keys its pattern allows.

        Args:
            x: (B, 1, D) the hidden state at stream position `start`.
            cache: this layer's (keys, values); position `start` is written here.
            start: the stream position.
            text_len: text keys are positions `0 .. text_len - 1`.
            image_slice: the image keys this query may see, as a slice of stream positions.
            allowed: (n,) which keys of the slice are attended, or None for all.
        """
        batch = x.shape[0]
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)  # (B, 1, 3D)
        q, k, v = qkv.view(batch, 3, self.heads, 1, self.head_dim).unbind(1)  # each (B, H, 1, hd); T = 1
        keys, values = cache
        keys.narrow(2, start, 1).copy_(k)
        values.narrow(2, start, 1).copy_(v)
        out = _sparse_decode_attention(q, keys, values, text_len, image_slice, allowed)  # (B, H, 1, hd)
        return F.linear(out.reshape(batch, 1, -1), self.proj.weight, self.proj.bias)  # (B, 1, D); T = 1

    def static_decode(self, x: Tensor, cache: tuple[Tensor, Tensor], where: Tensor, mask: Tensor) -> Tensor:
        """`decode` with fixed shapes: attends over the whole cache through a mask row.

        Args:
            x: (B, 1, D) the hidden state at stream position `where`.
            cache: this layer's (keys, values), (B, H, max_len, hd); `where` is written here.
            where: (1,) int64, the stream position.
            mask: (1, max_len) boolean, the position's row of the layer's mask.
        """
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        keys, values = cache
        keys.index_copy_(2, where, k)  # (B, H, max_len, hd)
        values.index_copy_(2, where, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, 1, hd)
        return self.proj(out.transpose(1, 2).reshape(batch, 1, -1))  # (B, 1, D)


def _sparse_decode_attention(q: Tensor, keys: Tensor, values: Tensor, text_len: int, image_slice: slice,
                             allowed: Tensor | None) -> Tensor:
    """One query per row over the text keys plus one slice of image keys.

    Equal to masked attention over the whole cache, but reads only the keys the layer's
    pattern lets the query see (decoding is bound by memory reads, not arithmetic).

    Args:
        q: (B, H, 1, hd) the query.
        keys, values: (B, H, >= stop, hd) the cache up to and including the query.
        text_len: the text keys are positions 0 .. text_len - 1.
        image_slice: the image keys, as a slice of stream positions.
        allowed: (n,) which keys of the slice are attended, or None for all.
    """
    q = q * q.shape[-1] ** -0.5
    text_k, text_v = keys[:, :, :text_len], values[:, :, :text_len]  # (B, H, L, hd)
    image_k, image_v = keys[:, :, image_slice], values[:, :, image_slice]  # (B, H, n, hd)
    image_scores = q @ image_k.transpose(-1, -2)  # (B, H, 1, n)
    if allowed is not None:
        image_scores = image_scores.masked_fill(~allowed, float("-inf"))
    scores = torch.cat([q @ text_k.transpose(-1, -2), image_scores], dim=-1)  # (B, H, 1, L + n)
    probs = scores.softmax(dim=-1)
    return probs[..., :text_len] @ text_v + probs[..., text_len:] @ image_v  # (B, H, 1, hd)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, plan: WindowPlan, dropout: float = 0.0) -> Tensor:
    """Masked attention over `[text | image]` computed in windows (see `WindowPlan`).

    The text queries attend causally within the text block; the image queries, chunk by
    chunk, to the text block and their chunk's window of image keys. Equal to attention
    through the pattern's dense mask, at a fraction of its arithmetic.

    Args:
        q, k, v: (B, H, T, hd) with T = text_len + n, n = N - 1 or N image tokens.
        plan: the layer's WindowPlan (mask (C, c, L + W): C chunks of c tokens).
        dropout: attention dropout probability.
    """
    text_len = plan.text_len
    out_text = F.scaled_dot_product_attention(q[:, :, :text_len], k[:, :, :text_len], v[:, :, :text_len],
                                              dropout_p=dropout, is_causal=True)  # (B, H, L, hd)
    queries, keys, values, mask = _windows(q, k, v, plan)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout)
    batch, heads, length, head_dim = q.shape
    out = out.view(batch, heads, -1, head_dim)  # (B, H, C * c, hd) in chunk order
    if plan.order is not None:
        out = torch.empty_like(out).index_copy_(2, plan.order, out)  # back to raster order
    return torch.cat([out_text, out[:, :, :length - text_len]], dim=2)  # (B, H, T, hd)


def _windows(q: Tensor, k: Tensor, v: Tensor, plan: WindowPlan) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The image queries and their windows of keys and values, as the attention kernel takes them.

    Returns queries (B, H * C, c, hd), keys and values (B, H * C, L + W, hd) and the mask
    (1, H * C, c, L + W): heads and chunks share one batch axis, so the kernel sees 4-D
    inputs and a 4-D mask (with a 3-D mask it falls back to the unfused path, 2x slower here).
    """
    chunks, chunk, width = plan.mask.shape
    text_len = plan.text_len
    batch, heads, length, head_dim = q.shape
    n_image = chunks * chunk

    def image_part(t: Tensor) -> Tensor:  # (B, H, C, c, hd) in chunk order; a missing last token is zeros
        t = F.pad(t[:, :, text_len:], (0, 0, 0, n_image - (length - text_len)))
        t = t if plan.order is None else t[:, :, plan.order]
        return t.reshape(batch, heads, chunks, chunk, head_dim)

    def windows_of(t: Tensor) -> Tensor:  # (B, H, C, L + W, hd): the text, then the chunk's window
        image = image_part(t)
        parts = [t[:, :, None, :text_len].expand(batch, heads, chunks, text_len, head_dim)]
        for shift in range(plan.back, 0, -1):  # the chunk `shift` back, zeros before the first
            parts.append(F.pad(image[:, :, :chunks - shift], (0, 0, 0, 0, shift, 0)))
        return torch.cat(parts + [image], dim=3)

    queries = image_part(q).reshape(batch, heads * chunks, chunk, head_dim)
    keys = windows_of(k).reshape(batch, heads * chunks, width, head_dim)
    values = windows_of(v).reshape(batch, heads * chunks, width, head_dim)
    mask = plan.mask.repeat(heads, 1, 1)[None]  # (1, H * C, c, L + W), as the (h, c) flattening above
    return queries, keys, values, mask


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention, compiled on CUDA (where it makes fused kernels), eager elsewhere."""
    if q.device.type == "cuda":
        global _compiled_flex
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager flex (tests on CPU) warns that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask)


_compiled_flex = None
