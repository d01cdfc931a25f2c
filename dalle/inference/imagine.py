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
    clip_score: float
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
            frame_every: int = 0, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> Imagined:
    """Optimises the image tokenizer's code logits for `prompt`; returns the argmax picture.

    Args:
        tokenizer: the image tokenizer (dVAE or VQGAN) whose codes are optimised (its weights stay fixed).
        scorer: the CLIP that judges (ours, or `hf:NAME`).
        prompt: what the picture should show.
        steps: optimisation steps (Adam).
        seed: the initial logits and the augmentations.
        init_codes: (N,) codes to start from (e.g. a transformer sample); None: random logits.
        lr: Adam's learning rate on the logits.
        cutouts: augmented views per step.
        smoothness: the weight of the total-variation term (0: none).
        frame_every: keep the picture every this many steps (0: none).
    """
    if not 1 <= steps <= 10_000:
        raise DalleError(f"steps must be in [1, 10000], got {steps}")
    if not 1 <= cutouts <= 64:
        raise DalleError(f"cutouts must be in [1, 64], got {cutouts}")
    if not (math.isfinite(smoothness) and smoothness >= 0):
        raise DalleError(f"smoothness must be finite and >= 0, got {smoothness}")
    device = next(tokenizer.parameters()).device
    grid, vocab = tokenizer.grid, tokenizer.codebook_size
    generator = torch.Generator().manual_seed(seed)
    if init_codes is None:
        start = torch.randn(1, vocab, grid, grid, generator=generator)
    else:  # a confident start on the given codes, still movable
        start = 4.0 * F.one_hot(init_codes.view(1, grid, grid).cpu(), vocab).permute(0, 3, 1, 2).float()
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
    codes = logits.detach().argmax(dim=1)  # (1, h, w)
    picture = tokenizer.decode(codes)  # (1, 3, S, S)
    final = float(score_images(scorer, prompt, picture.cpu())[0])
    image = tensor_to_pil(picture[0])
    return Imagined(image, codes.flatten().cpu(), final, frames + ([image] if frame_every else []))


def _optimise(tokenizer: ImageTokenizer, scorer: Scorer, logits: torch.Tensor, text: torch.Tensor, steps: int,
              lr: float, cutouts: int, smoothness: float, frame_every: int, generator: torch.Generator, progress: bool,
              on_step: Callable[[int, float], None] | None) -> list[Image.Image]:
    """The optimisation loop; returns the frames."""
    vocab = tokenizer.codebook_size
    optimizer = torch.optim.Adam([logits], lr=lr)
    frames = []
    bar = tqdm(range(steps), desc="imagine", disable=not progress, leave=False)
    for step in bar:
        soft = logits.softmax(dim=1)  # (1, K, h, w)
        hard = F.one_hot(soft.argmax(dim=1), vocab).permute(0, 3, 1, 2).to(soft.dtype)
        z = hard + soft - soft.detach()  # forward: codes; backward: the softmax
        pixels = tokenizer.decode_one_hot(z)  # (1, 3, S, S)
        views = augment(pixels, cutouts, generator)
        similarity = (differentiable_image_embedding(scorer, views) @ text[0].to(views.device)).mean()
        loss = -similarity
        if smoothness:
            loss = loss + smoothness * total_variation(pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        score = scorer.logit_scale * similarity.item()
        bar.set_postfix(clip=f"{score:.2f}")
        if on_step is not None:
            on_step(step, score)
        if frame_every and step % frame_every == 0:
            frames.append(tensor_to_pil(pixels[0].detach()))
    return frames
