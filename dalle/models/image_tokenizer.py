"""What the transformer stage, the pipeline and the evaluations need of an image tokenizer,
whichever it is: OpenAI's dVAE (`dalle.models.dvae`) or taming's VQGAN (`dalle.models.vqgan`).

A pipeline (run) directory holds one of them, as `dvae/` or `vqgan/`; the kind written in its
config.json decides which class loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from dalle.checkpoint import CONFIG_FILE, CheckpointError
from dalle.models.dvae import load_dvae
from dalle.models.vqgan import load_vqgan

# The directory name of each kind inside a pipeline directory (the kind itself).
KINDS = ("dvae", "vqgan")
NAMES = {"dvae": "dVAE", "vqgan": "VQGAN"}  # how messages and model cards write each kind


@runtime_checkable
class ImageTokenizer(Protocol):
    """Pictures <-> a square grid of codes. Implemented by `DVAE` and `VQGAN` (both `nn.Module`s)."""

    kind: str  # "dvae" | "vqgan": its directory name in a pipeline

    @property
    def codebook_size(self) -> int:
        """How many codes there are (the transformer's image vocabulary)."""
        ...

    @property
    def grid(self) -> int:
        """The side of the code grid (grid * grid codes per picture)."""
        ...

    @property
    def image_size(self) -> int:
        """The picture side it reads and draws."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, C, S, S) in [0, 1] -> int64 (B, grid, grid)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 (B, grid, grid) -> float (B, C, S, S) in [0, 1]."""
        ...

    def decode_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, codebook_size, grid, grid) one-hot or relaxed codes -> (B, C, S, S) in [0, 1], with
        gradients (what `dalle imagine` optimises through)."""
        ...


def load_image_tokenizer(directory: str | Path) -> ImageTokenizer:
    """A dVAE or VQGAN model directory, by the kind its config.json names (in eval mode)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON object: {error}") from None
    if kind == "dvae":
        return load_dvae(directory)
    if kind == "vqgan":
        return load_vqgan(directory)
    raise CheckpointError(f"{directory} holds a {kind!r} model, not an image tokenizer (dvae or vqgan)")


def image_tokenizer_dir(pipeline_dir: str | Path) -> Path:
    """The image tokenizer's directory inside a pipeline directory: `dvae/` or `vqgan/` (exactly one)."""
    pipeline_dir = Path(pipeline_dir)
    found = [pipeline_dir / kind for kind in KINDS if (pipeline_dir / kind).is_dir()]
    if not found:
        raise CheckpointError(f"{pipeline_dir} is not a pipeline directory: it has no image tokenizer "
                              f"({' or '.join(f'{kind}/' for kind in KINDS)})")
    if len(found) > 1:
        raise CheckpointError(f"{pipeline_dir} holds both dvae/ and vqgan/: a pipeline has one image tokenizer, "
                              "remove the one its transformer was not trained on")
    return found[0]
