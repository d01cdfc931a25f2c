"""Sampling image codes from a `DalleTransformer`: plain functions, no model methods.

The decode loop keeps a preallocated key/value cache (`KVCache`): the caption (and any
primed image tokens) are run once by `model.prefill`, then each new image token costs one
`model.decode_step` over a single position, whose queries read the cache through one row
of each layer's precomputed sparse mask. `use_cache=False` recomputes the whole stream at
every step instead; it exists to check the cache (both give the same tokens) and to
measure what it saves. `compile_step=True` runs each step through
`DalleTransformer.static_decode_step` under `torch.compile` (`StaticDecoder`): one graph
for every step, replayed as a CUDA graph on a GPU, where per-step launch overhead is what
bounds small-batch decoding.

Logits are processed in this order: classifier-free guidance, temperature, top-k, top-p.
Guidance (`cond_scale = s != 1`) runs every conditional row together with an
unconditional one (the empty, all-padding caption) in one batch and uses
`uncond + s * (cond - uncond)`.

Randomness: one uniform number per output token is drawn up front from a generator
seeded with `seed`, and a token is chosen by inverting the cumulative distribution at
that number. So a seed gives the same codes whatever `batch_size` and `use_cache` are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle.errors import DalleError
from dalle.models.transformer import DalleTransformer, KVCache, empty_captions


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keeps the k largest logits of each row, sets the others to -inf (ties at the k-th kept).

    Args:
        logits: (..., V).
        k: how many to keep; None or k >= V keeps everything.
    """
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise DalleError(f"top_k must be >= 1, got {k}")
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: keeps the smallest set of most likely tokens whose mass reaches p.

    The most likely token is always kept. Others are set to -inf.

    Args:
        logits: (..., V).
        p: the probability mass to keep, in (0, 1]; None or 1 keeps everything.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise DalleError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # (..., V); never the first token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divides logits by the temperature (> 0); 0 is greedy and is handled by the caller."""
    if temperature <= 0:
        raise DalleError(f"temperature must be > 0 here, got {temperature}")
    return logits / temperature


def guide(logits: Tensor, cond_scale: float) -> Tensor:
    """Classifier-free guidance on a batch stacked as [conditional rows; unconditional rows].

    Args:
        logits: (2R, V), rows 0..R-1 conditional, R..2R-1 their unconditional twins.
        cond_scale: s; returns uncond + s * (cond - uncond), (R, V).
    """
    cond, uncond = logits.float().chunk(2, dim=0)  # (R, V) each
    return uncond + cond_scale * (cond - uncond)


def choose_tokens(logits: Tensor, uniforms: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """(R,) one token per row from (R, V) logits, by inverse CDF at the given uniforms.

    `temperature == 0` is greedy (argmax). Inverting the CDF at a fixed uniform (instead of
    `torch.multinomial`) makes a token depend on its own random number only, so cached and
    uncached decoding, or different batch splits, pick the same tokens.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (R, V)
    target = uniforms[:, None].to(cdf) * cdf[:, -1:]  # (R, 1)
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]  # (R,)
    return tokens.clamp_(max=logits.shape[-1] - 1)


def sample_image_codes(model: DalleTransformer, text: Tensor, *, num_candidates: int = 1,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                       cond_scale: float = 1.0, prime: Tensor | None = None, seed: int | None = None,
                       use_cache: bool = True, batch_size: int | None = None,
                       return_logits: bool = False, compile_step: bool = False, keep: Tensor | None = None,
                       keep_mask: Tensor | None = None, stop: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Samples image codes for captions.

    Args:
        model: the transformer (its train/eval mode is restored afterwards; sampling runs
            in eval mode under `torch.inference_mode`).
        text: (B, L) caption ids, padding included (an all-padding row is the empty caption).
        num_candidates: images per caption; rows `b * num_candidates ..` are caption b's.
        temperature: softmax temperature; 0 is greedy.
        top_k: keep only the k most likely codes (None: all).
        top_p: nucleus filter mass (None: all).
        cond_scale: classifier-free guidance scale; 1 is plain conditional sampling.
        prime: (B, k) the first k image codes of each caption's images (raster order, so
            the top k / grid rows); the rest is completed. None: sample from scratch.
        seed: makes the result repeatable; None uses torch's global generator.
        use_cache: decode with the key/value cache (fast) or recompute every step.
        batch_size: at most this many output rows per model call (guidance doubles the
            model's batch); None: all rows at once. Does not change the result.
        return_logits: also return the (B * num_candidates, N, image_vocab) float32 logits
            each token was drawn from (after guidance, before temperature and filters;
            NaN at primed positions).
        compile_step: decode with the static-shape step under `torch.compile` (CUDA graphs
            on CUDA). The first call per batch size compiles (seconds to a minute); the
            tokens are those of the eager cache up to float rounding.
        keep, keep_mask: editing. `keep` (B, N) image codes and `keep_mask` (N,) bool: the
            positions where the mask is True keep their code; the others are sampled in
            raster order, each conditioned on the caption and every code before it.
            `prime` is the special case of the first k positions.
        stop: sample positions before `stop` only (the others stay as kept, or 0); with
            the same seed, continuing from the result gives the tokens of one whole run
            (the random numbers are drawn per position up front), which is how
            `Pipeline.stream` shows a picture forming.

    Returns:
        (B * num_candidates, N) int64 codes, N = grid**2; with `return_logits`, (codes, logits).
    """
    config = model.config
    device = model.text_emb.weight.device
    _check_sampling_args(model, text, prime, num_candidates, temperature, top_k, top_p, batch_size)
    if compile_step and not use_cache:
        raise DalleError("compile_step decodes with the cache; it cannot be combined with use_cache=False")
    rows_text = text.to(device, torch.long).repeat_interleave(num_candidates, dim=0)  # (R, L)
    rows = rows_text.shape[0]
    n_image = model.image_len
    keep, keep_mask = _kept_codes(model, text, prime, keep, keep_mask)  # (B, N), (N,)
    rows_keep = None if keep is None else keep.to(device).repeat_interleave(num_candidates, dim=0)  # (R, N)
    keep_mask = None if keep_mask is None else keep_mask.to(device)
    stop = n_image if stop is None else stop
    if not 0 <= stop <= n_image:
        raise DalleError(f"stop must be in [0, {n_image}], got {stop}")

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # One uniform per output token, drawn up front: results do not depend on batching.
    uniforms = torch.rand(rows, n_image, generator=generator, device=device)  # (R, N)

    codes = torch.empty(rows, n_image, dtype=torch.long, device=device)
    logits_out = None
    if return_logits:
        logits_out = torch.full((rows, n_image, config.image_vocab), float("nan"), device=device)
    chunk = batch_size or rows
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for begin in range(0, rows, chunk):
                end = min(begin + chunk, rows)
                codes[begin:end] = _decode(
                    model, rows_text[begin:end], None if rows_keep is None else rows_keep[begin:end], keep_mask,
                    uniforms[begin:end], temperature, top_k, top_p, cond_scale, use_cache,
                    None if logits_out is None else logits_out[begin:end], compile_step, stop)
    finally:
        model.train(was_training)
    return (codes, logits_out) if return_logits else codes


def _kept_codes(model: DalleTransformer, text: Tensor, prime: Tensor | None, keep: Tensor | None,
                keep_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(B, N) codes and the (N,) mask of the positions that keep them (priming is the top rows)."""
    n_image = model.image_len
    if prime is not None:
        if keep is not None:
            raise DalleError("give prime or keep (an edit), not both")
        keep = torch.zeros(prime.shape[0], n_image, dtype=torch.long, device=prime.device)
        keep[:, : prime.shape[1]] = prime
        keep_mask = torch.arange(n_image, device=prime.device) < prime.shape[1]
    if (keep is None) != (keep_mask is None):
        raise DalleError("an edit needs both keep (the codes) and keep_mask (where they stay)")
    if keep is None:
        return None, None
    if keep.dim() != 2 or keep.shape != (text.shape[0], n_image) or keep.dtype.is_floating_point:
        raise DalleError(f"keep must be ({text.shape[0]}, {n_image}) integer codes, got {tuple(keep.shape)}")
    if keep_mask.shape != (n_image,) or keep_mask.dtype != torch.bool:
        raise DalleError(f"keep_mask must be ({n_image},) booleans, got {tuple(keep_mask.shape)} {keep_mask.dtype}")
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= model.config.image_vocab):
        raise DalleError(f"kept codes must be in [0, {model.config.image_vocab})")
    return keep.long(), keep_mask


def _decode(model: DalleTransformer, text: Tensor, keep: Tensor | None, keep_mask: Tensor | None,
            uniforms: Tensor, temperature: float, top_k: int | None, top_p: float | None, cond_scale: float,
            use_cache: bool, logits_out: Tensor | None, compile_step: bool = False, stop: int | None = None) -> Tensor:
    """The decode loop for one batch of rows; returns (r, N) codes."""
    rows = text.shape[0]
    n_image = model.image_len
    stop = n_image if stop is None else stop
    guided = cond_scale != 1.0
    codes = torch.zeros(rows, n_image, dtype=torch.long, device=text.device)
    kept = [False] * n_image if keep_mask is None else keep_mask.tolist()
    if keep is not None:
        codes[:, keep_mask] = keep[:, keep_mask]
    start = next((i for i, k in enumerate(kept) if not k), n_image)  # the kept prefix goes in one prefill
    if start >= stop:
        return codes
    if guided:  # [conditional rows; unconditional rows] in one batch
        text = torch.cat([text, empty_captions(rows, model.config.text_vocab, model.text_len, text.device)])
    twin = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)

    static = static_decoder(model, text.shape[0]) if compile_step else None
    if static is not None:
        cache = static.reset()
    else:
        cache = model.new_cache(text.shape[0]) if use_cache else None
    logits = model.prefill(text, twin(codes[:, :start]), cache) if use_cache else None  # (r or 2r, Vi)
    for index in range(start, stop):
        if kept[index]:  # an edit keeps this code: it is read, not sampled
            tokens = codes[:, index]
        else:
            if not use_cache:
                logits = model.prefill(text, twin(codes[:, :index]))  # the whole stream again
            step_logits = guide(logits, cond_scale) if guided else logits  # (r, Vi)
            if logits_out is not None:
                logits_out[:, index] = step_logits.float()
            tokens = choose_tokens(step_logits, uniforms[:, index], temperature, top_k, top_p)  # (r,)
            codes[:, index] = tokens
        if static is not None and index + 1 < stop:
            logits = static(twin(tokens), index)
        elif use_cache and index + 1 < stop:
            logits = model.decode_step(twin(tokens), index, cache)
    return codes


class StaticDecoder(nn.Module):
    """A model's `static_decode_step` and its KV cache as one module, compiled once.

    The cache is a registered buffer, so the compiled step mutates it in place at a fixed
    address: on CUDA, `mode="reduce-overhead"` then captures the whole step (every layer,
    the cache writes, the head) as one CUDA graph; a cache passed as a plain argument would
    make inductor skip the graph for its mutated input.
    """

    def __init__(self, model: DalleTransformer, rows: int):
        super().__init__()
        self.model = model
        self.cache = model.new_cache(rows)
        self.register_buffer("keys_values", self.cache.data, persistent=False)
        device = self.cache.data.device
        self.indices = torch.arange(model.image_len, device=device)  # step numbers as device tensors
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.compiled = torch.compile(self.step, fullgraph=True, dynamic=False, mode=mode)

    def step(self, token: Tensor, index: Tensor) -> Tensor:
        return self.model.static_decode_step(token, index, self.keys_values)

    def reset(self) -> KVCache:
        """The cache, emptied, for `prefill` to fill."""
        self.cache.length = 0
        return self.cache

    def forward(self, token: Tensor, index: int) -> Tensor:
        """(B, Vi) logits of image token `index + 1`, as `model.decode_step`."""
        cache = self.cache
        if cache.length != self.model.text_len + index:
            raise DalleError(f"cache holds {cache.length} positions, step {index} needs "
                             f"{self.model.text_len + index}")
        logits = self.compiled(token, self.indices[index])
        cache.length += 1
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay


def static_decoder(model: DalleTransformer, rows: int) -> StaticDecoder:
    """The model's `StaticDecoder` for `rows` rows, built (and compiled) on first use."""
    decoders = model.__dict__.setdefault("_static_decoders", {})  # not a submodule: no state_dict entry
    device, dtype = model.text_emb.weight.device, model.text_emb.weight.dtype
    key = (rows, str(device), dtype)
    if key not in decoders:
        decoders[key] = StaticDecoder(model, rows)
    return decoders[key]


def _check_sampling_args(model: DalleTransformer, text: Tensor, prime: Tensor | None, num_candidates: int,
                         temperature: float, top_k: int | None, top_p: float | None,
                         batch_size: int | None) -> None:
    """One-line errors for arguments a caller can get wrong."""
    config = model.config
    if not isinstance(text, Tensor) or text.dim() != 2 or text.shape[1] != model.text_len:
        shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
        raise DalleError(f"text must be a (batch, {model.text_len}) tensor of token ids, got {shape}")
    if text.dtype.is_floating_point or text.dtype == torch.bool:
        raise DalleError(f"text must hold integer token ids, got {text.dtype}")
    if text.numel() and (int(text.min()) < 0 or int(text.max()) >= config.text_vocab):
        raise DalleError(f"text ids must be in [0, {config.text_vocab}), got {int(text.min())}..{int(text.max())}")
    if prime is not None:
        if prime.dim() != 2 or prime.shape[0] != text.shape[0] or prime.shape[1] > model.image_len:
            raise DalleError(f"prime must be (batch={text.shape[0]}, k <= {model.image_len}) image codes, "
                             f"got {tuple(prime.shape)}")
        if prime.dtype.is_floating_point or prime.dtype == torch.bool:
            raise DalleError(f"prime must hold integer image codes, got {prime.dtype}")
        if prime.numel() and (int(prime.min()) < 0 or int(prime.max()) >= config.image_vocab):
            raise DalleError(f"prime codes must be in [0, {config.image_vocab})")
    if num_candidates < 1:
        raise DalleError(f"num_candidates must be >= 1, got {num_candidates}")
    if temperature < 0:
        raise DalleError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise DalleError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise DalleError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise DalleError(f"batch_size must be >= 1, got {batch_size}")
