"""Scoring pictures against words with a CLIP: reranking, zero-shot classification, search.

Everything here goes through a small `Scorer` interface, which our own CLIP (with the
project tokenizer) and a Hugging Face `transformers` CLIPModel (`dalle.inference.hf_clip`) both
satisfy:

- `embed_texts(texts) -> (n, D)` L2-normalised caption embeddings;
- `embed_images(images) -> (n, D)` L2-normalised picture embeddings, from a float tensor
  (n, 3, H, W) in [0, 1] or a list of PIL images;
- `logit_scale`: the model's inverse temperature, a float;
- `embed_dim`: D, an int.

A score is `logit_scale * cosine`, the same number as CLIP's `logits_per_image`, so scores
from one model are comparable across calls. Pictures always go through the image encoder
`batch_size` at a time, so ranking 512 candidates needs the memory of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from dalle.errors import DalleError
from dalle.images import pil_to_tensor

Images = torch.Tensor | Sequence[Image.Image]  # (N, 3, H, W) floats in [0, 1], or PIL images


@runtime_checkable
class Scorer(Protocol):
    """What reranking, classification and search need from a CLIP."""

    @property
    def logit_scale(self) -> float:
        """The inverse temperature that turns cosines into logits."""
        ...

    @property
    def embed_dim(self) -> int:
        """D, the size of the shared embedding space."""
        ...

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(n, D) L2-normalised embeddings of `texts`, on the CPU."""
        ...

    def embed_images(self, images: Images) -> torch.Tensor:
        """(n, D) L2-normalised embeddings of one batch of pictures, on the CPU."""
        ...


class CLIPScorer:
    """Our `dalle.clip.CLIP` plus the project tokenizer, as a `Scorer`.

    Args:
        model: a `dalle.clip.CLIP`.
        tokenizer: anything with `encode(list[str]) -> LongTensor (n, text_len)`.
        device: where to run the model (default: where its weights are).
    """

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.item()

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        text_ids = self.tokenizer.encode(list(texts)).to(self.device)  # (n, text_len)
        return self.model.encode_text(text_ids).float().cpu()  # (n, D)

    @torch.inference_mode()
    def embed_images(self, images: Images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            size = self.model.config.image_size
            if not len(images):
                return torch.zeros(0, self.embed_dim)
            images = torch.stack([pil_to_tensor(image, size) for image in images])  # (n, 3, S, S)
        return self.model.encode_image(images.to(self.device)).float().cpu()  # (n, D)


def embed_images(scorer: Scorer, images: Images, batch_size: int = 64) -> torch.Tensor:
    """Embeds any number of pictures, `batch_size` at a time (bounded memory).

    Args:
        scorer: the CLIP to use.
        images: (N, 3, H, W) floats in [0, 1] or a list of N PIL images.
        batch_size: pictures per call of the image encoder.

    Returns:
        (N, D) L2-normalised embeddings, on the CPU.
    """
    if batch_size < 1:
        raise DalleError(f"batch size must be >= 1, got {batch_size}")
    chunks = [scorer.embed_images(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    if not chunks:
        return torch.zeros(0, scorer.embed_dim)
    return torch.cat(chunks)  # (N, D)


def score_images(scorer: Scorer, prompt: str, images: Images, batch_size: int = 64) -> torch.Tensor:
    """CLIP scores of N pictures against one prompt, in the pictures' order.

    Returns:
        (N,) floats: `logit_scale * cosine(picture, prompt)`.
    """
    text = scorer.embed_texts([prompt])  # (1, D)
    image = embed_images(scorer, images, batch_size)  # (N, D)
    return scorer.logit_scale * (image @ text[0])  # (N,)


def rerank(scorer: Scorer, prompt: str, images: Images, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks N candidate pictures for a prompt, as DALL-E reranks its samples.

    Args:
        scorer: the CLIP to use.
        prompt: the caption the pictures were generated from.
        images: (N, 3, H, W) floats in [0, 1] or a list of N PIL images.
        batch_size: pictures per call of the image encoder (memory bound).

    Returns:
        (order, scores): `order` (N,) int64 picture indices, best first (ties keep
        sampling order); `scores` (N,) the score of each picture, in sampling order.
    """
    scores = score_images(scorer, prompt, images, batch_size)  # (N,)
    order = torch.sort(scores, descending=True, stable=True).indices  # (N,)
    return order, scores


def classify(scorer: Scorer, images: Images, labels: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Zero-shot classification: how probable each label is for each picture.

    Args:
        scorer: the CLIP to use.
        images: (N, 3, H, W) floats in [0, 1] or a list of N PIL images.
        labels: the candidate captions, e.g. "a red circle", "a blue square".
        batch_size: pictures per call of the image encoder.

    Returns:
        (N, L) probabilities, each row a softmax over the labels of the scaled cosines.
    """
    labels = list(labels)
    if not labels:
        raise DalleError("classify needs at least one label")
    text = scorer.embed_texts(labels)  # (L, D)
    image = embed_images(scorer, images, batch_size)  # (N, D)
    return F.softmax(scorer.logit_scale * image @ text.t(), dim=-1)  # (N, L)


def top_k(embeddings: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k embeddings most similar to `query`, best first.

    Args:
        embeddings: (N, D) L2-normalised embeddings (e.g. of a folder of pictures).
        query: (D,) an L2-normalised query embedding.
        k: how many to return (fewer when N < k).

    Returns:
        (indices, cosines), each (min(k, N),), best first.
    """
    if k < 1:
        raise DalleError(f"k must be >= 1, got {k}")
    cosines = embeddings.float() @ query.float()  # (N,)
    best = torch.sort(cosines, descending=True, stable=True).indices[:k]  # (k,)
    return best, cosines[best]


def search(scorer: Scorer, query: str, image_embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image search over pictures embedded beforehand with `embed_images`.

    Args:
        scorer: the CLIP that made `image_embeddings`.
        query: the words to look for, e.g. "a red circle".
        image_embeddings: (N, D) from `embed_images` with the same scorer.
        k: how many hits to return.

    Returns:
        (indices, scores), each (min(k, N),), best first; scores are `logit_scale * cosine`.
    """
    if not query.strip():
        raise DalleError("the search query is empty")
    indices, cosines = top_k(image_embeddings, scorer.embed_texts([query])[0], k)
    return indices, scorer.logit_scale * cosines
