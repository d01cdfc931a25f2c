"""The digits evaluation: a small reader of handwritten digits judges what a pipeline draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle.config import DataConfig
from dalle.data.sources import DIGIT_WORDS, open_source
from dalle.images import pil_to_tensor
from dalle.inference.pipeline import Pipeline
from dalle.viz import labelled_grid, save_png


def _share(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


class DigitReader(torch.nn.Module):
    """A small MLP that reads a handwritten digit (trained on the digits train split)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) floats in [0, 1] -> (B, 10) logits, read from the grey level."""
        return self.net(images.mean(1))


def _digit_tensors(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    source = open_source("digits", DataConfig(source="digits", split=split, size=size))
    images = torch.stack([pil_to_tensor(image) for image, _ in source])
    labels = torch.tensor([DIGIT_WORDS.index(caption.split()[-1]) for _, caption in source])
    return images, labels


def train_digit_reader(size: int, steps: int = 300, seed: int = 0) -> tuple[DigitReader, float]:
    """Trains the digit reader on the 4,000 training digits; returns it and its test accuracy."""
    torch.manual_seed(seed)
    images, labels = _digit_tensors("train", size)
    reader = DigitReader(size)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(reader(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reader.eval()
    test_images, test_labels = _digit_tensors("test", size)
    with torch.no_grad():
        accuracy = (reader(test_images).argmax(1) == test_labels).float().mean().item()
    return reader, accuracy


def evaluate_digits(pipeline: Pipeline, out: Path, candidates: int, prompts_per_digit: int, seed: int,
                    progress: bool = True, **sampling) -> dict:
    """How often the digit reader reads the asked digit at top-1 and for a random candidate."""
    reader, reader_accuracy = train_digit_reader(pipeline.image_size)
    top, rand, rows, titles = [], [], [], []
    prompts = [(digit, f"a handwritten {word}") for digit, word in enumerate(DIGIT_WORDS)
               for _ in range(prompts_per_digit)]
    rerank = pipeline.scorer is not None
    for index, (digit, prompt) in enumerate(tqdm(prompts, desc="digits", disable=not progress, leave=False)):
        (samples,) = pipeline([prompt], candidates=candidates, keep=candidates, seed=seed + index,
                              rerank_with_clip=rerank, **sampling)
        random_pick = next(s for s in samples if s.candidate == 0)
        with torch.no_grad():
            read = reader(torch.stack([pil_to_tensor(samples[0].image), pil_to_tensor(random_pick.image)])).argmax(1)
        top.append(int(read[0]) == digit)
        rand.append(int(read[1]) == digit)
        if index % prompts_per_digit == 0:
            rows.append([s.image for s in samples[:8]])
            titles.append(prompt)
    save_png(labelled_grid(rows, row_titles=titles, cell=64), out / "digits.png")
    return {"top1_digit": _share(top), "random_digit": _share(rand), "prompts": len(prompts),
            "reader_test_accuracy": reader_accuracy}


