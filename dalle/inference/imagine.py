"""`dalle imagine`: a picture found by optimising the tokenizer's codes so that CLIP scores it high.

No transformer is needed (VQGAN+CLIP, as Pixray does it, here on the dVAE or the VQGAN): the
code grid is a learnt tensor of logits (h, w, K); each step decodes the straight-through
one-hot of their softmax (the forward pass is a picture the tokenizer can make; the gradient
goes through the softmax), cuts random crops, shifts and adds noise so CLIP is not fooled by
a few adversarial pixels, and moves the logits towards a higher CLIP score for the prompt.
The dVAE's decoder reads the one-hot itself; the VQGAN's reads its codebook vectors (the
one-hot times the codebook), so both tokenizers take the same path.
`init="sample"` starts from the transformer's best sample (DALL-E + CLIP refinement).
`smoothness` adds the pictures' total variation (mean absolute difference of neighbouring
pixels) to the loss, for one solid object rather than pieces. The result is the argmax
codes, decoded. A plain CLIP is easily fooled by pieces of the right colour; a judge
fine-tuned on adversarial pictures (`dalle train-judge`) draws whole objects far more often.
`restarts` optimises several starts in one batch (Adam is per-element, so each is its own
run) and keeps the one a second CLIP, the `ranker`, scores highest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from dalle.errors import DalleError
from dalle.images import tensor_to_pil
from dalle.inference.hf_clip import HFCLIPScorer
from dalle.inference.scoring import CLIPScorer, Scorer, score_images
from dalle.models.image_tokenizer import ImageTokenizer


@dataclass
class Imagined:
    """What `imagine` found."""

    image: Image.Image
    codes: torch.Tensor  # (N,) raster order
    clip_score: float  # by the CLIP that guided the optimisation
    rank_score: float | None = None  # by the ranker that chose among the restarts (None: one start)
    candidates: list[torch.Tensor] = field(default_factory=list)  # every restart's (N,) codes
    candidate_images: list[Image.Image] = field(default_factory=list)  # every restart's picture, decoded
    frames: list[Image.Image] = field(default_factory=list)  # the picture every `frame_every` steps


def differentiable_image_embedding(scorer: Scorer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, D) L2-normalised, with gradients (our CLIP or a Hugging Face one)."""
    if isinstance(scorer, CLIPScorer):
        return scorer.model.encode_image(images.to(scorer.device))
    if isinstance(scorer, HFCLIPScorer):
        processor = scorer.processor.image_processor
        crop = processor.crop_size  # an int, a dict or a SizeDict, by transformers version
        side = int(crop if isinstance(crop, int) else getattr(crop, "height", None) or crop["height"])
        mean = torch.tensor(processor.image_mean, device=scorer.device).view(1, 3, 1, 1)
        std = torch.tensor(processor.image_std, device=scorer.device).view(1, 3, 1, 1)
        pixels = F.interpolate(images.to(scorer.device), size=(side, side), mode="bicubic", align_corners=False)
        output = scorer.model.get_image_features(pixel_values=(pixels - mean) / std)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return F.normalize(features.float(), dim=-1)
    raise DalleError(f"imagine needs our CLIP or a Hugging Face CLIP, not {type(scorer).__name__}")


def augment(images: torch.Tensor, cutouts: int, generator: torch.Generator) -> torch.Tensor:
    """`cutouts` views of one picture: random crops of 60-100 % of its side, resized back, plus noise."""
    _, _, side, _ = images.shape
    views = []
    for _ in range(cutouts):
        crop = int(side * (0.6 + 0.4 * torch.rand(1, generator=generator).item()))
        top, left = (int(torch.randint(0, side - crop + 1, (1,), generator=generator)) for _ in range(2))
        view = images[:, :, top:top + crop, left:left + crop]
        views.append(F.interpolate(view, size=(side, side), mode="bilinear", align_corners=False))
    views = torch.cat(views)  # (cutouts, 3, S, S)
    noise = 0.03 * torch.randn(views.shape, generator=generator).to(views.device)
    return (views + noise).clamp(0, 1)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference of vertically plus horizontally neighbouring pixels of (B, 3, H, W)."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + (images[..., 1:] - images[..., :-1]).abs().mean()


def imagine(tokenizer: ImageTokenizer, scorer: Scorer, prompt: str, *, steps: int = 100, seed: int = 0,
            init_codes: torch.Tensor | None = None, lr: float = 0.2, cutouts: int = 8, smoothness: float = 0.0,
            restarts: int = 1, ranker: Scorer | None = None, frame_every: int = 0, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> Imagined:
    """Optimises the image tokenizer's code logits for `prompt`; returns the argmax picture.

    Args:
        tokenizer: the image tokenizer (dVAE or VQGAN) whose codes are optimised (its weights stay fixed).
        scorer: the CLIP that judges (ours, or `hf:NAME`).
        prompt: what the picture should show.
        steps: optimisation steps (Adam).
        seed: the initial logits and the augmentations.
        init_codes: (N,) or (restarts, N) codes to start from (e.g. transformer samples); None: random logits.
        lr: Adam's learning rate on the logits.
        cutouts: augmented views per step.
        smoothness: the weight of the total-variation term (0: none).
        restarts: starts optimised together; the result is the one `ranker` scores highest.
        ranker: the CLIP that chooses among the restarts (default: `scorer`).
        frame_every: keep the picture every this many steps (0: none).
    """
    if not 1 <= steps <= 10_000:
        raise DalleError(f"steps must be in [1, 10000], got {steps}")
    if not 1 <= cutouts <= 64:
        raise DalleError(f"cutouts must be in [1, 64], got {cutouts}")
    if not (math.isfinite(smoothness) and smoothness >= 0):
        raise DalleError(f"smoothness must be finite and >= 0, got {smoothness}")
    if not 1 <= restarts <= 64:
        raise DalleError(f"restarts must be in [1, 64], got {restarts}")
    device = next(tokenizer.parameters()).device
    grid, vocab = tokenizer.grid, tokenizer.codebook_size
    generator = torch.Generator().manual_seed(seed)
    if init_codes is None:
        start = torch.randn(restarts, vocab, grid, grid, generator=generator)
    else:  # a confident start on the given codes, still movable
        init_codes = init_codes.view(-1, grid, grid).cpu()
        if init_codes.shape[0] not in (1, restarts):
            raise DalleError(f"init_codes has {init_codes.shape[0]} starts for {restarts} restarts")
        start = 4.0 * F.one_hot(init_codes.expand(restarts, -1, -1), vocab).permute(0, 3, 1, 2).float()
    logits = start.to(device).requires_grad_(True)
    with torch.no_grad():
        text = scorer.embed_texts([prompt]).to(device).clone()  # (1, D); a normal tensor, not an inference one
    frozen = [p for module in (tokenizer, getattr(scorer, "model", None)) if module is not None
              for p in module.parameters() if p.requires_grad]
    for p in frozen:  # only the logits learn: no gradients for the weights
        p.requires_grad_(False)
    try:
        frames = _optimise(tokenizer, scorer, logits, text, steps, lr, cutouts, smoothness, frame_every, generator,
                           progress, on_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    codes = logits.detach().argmax(dim=1)  # (R, h, w)
    pictures = tokenizer.decode(codes).cpu()  # (R, 3, S, S)
    rank_scores = score_images(ranker or scorer, prompt, pictures) if restarts > 1 else None
    best = int(rank_scores.argmax()) if rank_scores is not None else 0
    final = float(score_images(scorer, prompt, pictures[best:best + 1])[0])
    candidate_images = [tensor_to_pil(picture) for picture in pictures]
    image = candidate_images[best]
    frames = [frame[best] for frame in frames] + ([image] if frame_every else [])
    return Imagined(image, codes[best].flatten().cpu(), final, frames=frames, candidates=list(codes.flatten(1).cpu()),
                    candidate_images=candidate_images,
                    rank_score=float(rank_scores[best]) if rank_scores is not None else None)


def _optimise(tokenizer: ImageTokenizer, scorer: Scorer, logits: torch.Tensor, text: torch.Tensor, steps: int,
              lr: float, cutouts: int, smoothness: float, frame_every: int, generator: torch.Generator, progress: bool,
              on_step: Callable[[int, float], None] | None) -> list[Image.Image]:
    """The optimisation loop over (R, K, h, w) logits; returns the frames, each a list of R pictures."""
    vocab, restarts = tokenizer.codebook_size, logits.shape[0]
    optimizer = torch.optim.Adam([logits], lr=lr)
    frames = []
    bar = tqdm(range(steps), desc="imagine", disable=not progress, leave=False)
    for step in bar:
        soft = logits.softmax(dim=1)  # (R, K, h, w)
        hard = F.one_hot(soft.argmax(dim=1), vocab).permute(0, 3, 1, 2).to(soft.dtype)
        z = hard + soft - soft.detach()  # forward: codes; backward: the softmax
        pixels = tokenizer.decode_one_hot(z)  # (R, 3, S, S)
        views = augment(pixels, cutouts, generator)  # (cutouts * R, 3, S, S), cutout-major
        cosines = differentiable_image_embedding(scorer, views) @ text[0].to(views.device)
        similarity = cosines.view(cutouts, restarts).mean(dim=0)  # (R,)
        loss = -similarity.mean()
        if smoothness:
            loss = loss + smoothness * total_variation(pixels)
        loss = restarts * loss  # the sum of the restarts' own losses: each moves as if alone
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        score = scorer.logit_scale * similarity.max().item()
        bar.set_postfix(clip=f"{score:.2f}")
        if on_step is not None:
            on_step(step, score)
        if frame_every and step % frame_every == 0:
            frames.append([tensor_to_pil(picture) for picture in pixels.detach()])
    return frames
