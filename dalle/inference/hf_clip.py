"""A pretrained Hugging Face CLIP (`--clip hf:NAME_OR_DIR`) behind the `dalle.inference.scoring.Scorer` interface.

`transformers` is an optional extra (`pip install 'dalle[hf]'`), imported only when such a
CLIP is asked for. The model's own processor prepares the inputs, so scores equal the
model's `logits_per_image`. Float pictures in [0, 1] are turned into 8-bit PIL images
first: the processors are written for those, and 8 bits is what these CLIPs saw in training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dalle.errors import DalleError
from dalle.images import tensor_to_pil
from dalle.inference.scoring import Images


def import_transformers() -> Any:
    """The `transformers` module, or a one-line DalleError saying how to install it."""
    try:
        import transformers  # lazy: an optional extra (dalle[hf]), seconds to import
    except ImportError:
        raise DalleError("a Hugging Face CLIP (--clip hf:...) needs transformers: "
                         "pip install 'dalle[hf]' (or pip install transformers)") from None
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _features(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected features; 5 returns an output with them pooled.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFCLIPScorer:
    """A `transformers` CLIPModel and its CLIPProcessor, as a `dalle.inference.scoring.Scorer`.

    Args:
        name_or_dir: a Hub name (e.g. `openai/clip-vit-base-patch32`, needs the network or
            the local cache) or a directory written by `save_pretrained`.
        device: where to run the model.
    """

    def __init__(self, name_or_dir: str, device: str | torch.device = "cpu"):
        transformers = import_transformers()
        if not name_or_dir:
            raise DalleError("--clip hf: needs a model name or directory, e.g. hf:openai/clip-vit-base-patch32")
        self.device = torch.device(device)
        try:
            self.model = transformers.CLIPModel.from_pretrained(name_or_dir).to(self.device).eval()
            self.processor = transformers.CLIPProcessor.from_pretrained(name_or_dir)
        except (OSError, ValueError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DalleError(f"cannot load the Hugging Face CLIP {name_or_dir!r}: {first}") from None

    @property
    def logit_scale(self) -> float:
        # CLIPModel.forward uses exp(logit_scale) unclamped; so do we, to match its logits.
        return self.model.logit_scale.detach().exp().item()

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        texts = [str(t).encode("utf-8", "replace").decode("utf-8") for t in texts]  # lone surrogates -> U+FFFD
        inputs = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        features = _features(self.model.get_text_features(**inputs))  # (n, D)
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_images(self, images: Images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = [tensor_to_pil(image) for image in images]
        if not len(images):
            return torch.zeros(0, self.embed_dim)
        images = [image.convert("RGB") for image in images]
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (n, D)
        return F.normalize(features.float(), dim=-1).cpu()
