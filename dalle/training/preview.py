"""Sample grids drawn while the transformer trains: what the model draws now, every N steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dalle.config import Config
from dalle.images import tensor_to_pil
from dalle.inference.sampling import sample_image_codes
from dalle.models.image_tokenizer import ImageTokenizer
from dalle.tokenizer import Tokenizer
from dalle.viz import labelled_grid, save_png

SAMPLE_PROMPTS = ["a red circle", "a small blue square in the top left", "a green triangle above a white circle"]
DIGIT_SAMPLE_PROMPTS = ["a handwritten zero", "a handwritten three", "a handwritten seven", "a handwritten nine"]


def sample_preview(config: Config, tokenizer: Tokenizer, image_tokenizer: ImageTokenizer, run_dir: Path,
                   every: int) -> Callable[[dict, torch.nn.Module], None]:
    """An `on_log` hook for `fit`: every `every` steps, run_dir/samples/step-N.png (4 per prompt)."""
    prompts = {"shapes": SAMPLE_PROMPTS, "digits": DIGIT_SAMPLE_PROMPTS}.get(config.data.source, [""] * 4)

    def draw(record: dict, model: torch.nn.Module) -> None:
        if not every or record["step"] % every:
            return
        text = tokenizer.encode(prompts).to(next(model.parameters()).device)
        codes = sample_image_codes(model, text, num_candidates=4, seed=0)  # (P * 4, h*w)
        grid = model.config.image_grid
        with torch.inference_mode():
            pixels = image_tokenizer.decode(codes.view(-1, grid, grid))  # (P * 4, 3, S, S)
        rows = [[tensor_to_pil(p) for p in pixels[i * 4 : (i + 1) * 4]] for i in range(len(prompts))]
        path = run_dir / "samples" / f"step-{record['step']:08d}.png"
        save_png(labelled_grid(rows, row_titles=prompts, cell=48), path)

    return draw
