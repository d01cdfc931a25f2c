"""Opening a CLIP to score with: one of ours (from a model, CLIP-run or pipeline directory,
with the tokenizer it was trained with) or a Hugging Face one (`hf:NAME_OR_DIR`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dalle.checkpoint import CheckpointError
from dalle.errors import DalleError
from dalle.inference.hf_clip import HFCLIPScorer
from dalle.inference.scoring import CLIPScorer, Scorer
from dalle.models.clip import load_clip
from dalle.tokenizer import TOKENIZER_FILE, load_tokenizer

HF_PREFIX = "hf:"  # --clip hf:NAME_OR_DIR: a Hugging Face CLIP


def load_scorer_for(directory: str | Path, clip: str | None = None, device: str | torch.device = "cpu") -> Scorer:
    """The CLIP of a pipeline (or CLIP-only) directory, or `clip` (hf:NAME or a directory) if given."""
    directory = Path(directory)
    if clip is not None and clip.startswith(HF_PREFIX):
        return load_scorer(clip, device=device)
    tokenizer_path = directory / TOKENIZER_FILE
    clip_dir = Path(clip) if clip else directory / "clip"
    if clip and not (clip_dir / "config.json").is_file() and (clip_dir / "clip").is_dir():
        clip_dir = clip_dir / "clip"  # a CLIP run (or pipeline) directory: its CLIP
    if clip and (clip_dir.parent / TOKENIZER_FILE).is_file():  # a CLIP from another run: its own tokenizer
        tokenizer_path = clip_dir.parent / TOKENIZER_FILE
    if not clip_dir.is_dir():
        if (directory / "config.json").is_file():  # the directory is itself a CLIP model directory
            clip_dir, tokenizer_path = directory, directory.parent / TOKENIZER_FILE
        else:
            raise CheckpointError(f"no CLIP in {directory}: expected {directory / 'clip'} (or pass --clip)")
    try:
        meta = json.loads((clip_dir / "config.json").read_text(encoding="utf-8"))
        text_len = int(meta["config"]["text_len"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        raise CheckpointError(f"{clip_dir} is not a CLIP model directory") from None
    if not tokenizer_path.is_file():
        raise CheckpointError(f"no {TOKENIZER_FILE} beside {clip_dir}: the CLIP needs its tokenizer")
    return load_scorer(clip_dir, tokenizer=load_tokenizer(tokenizer_path, text_len), device=device)


def load_scorer(spec: str | Path, tokenizer: Any = None, device: str | torch.device = "cpu") -> Scorer:
    """Opens a CLIP for scoring: `hf:NAME_OR_DIR` for Hugging Face, else one of our model directories.

    Args:
        spec: `hf:openai/clip-vit-base-patch32`, `hf:/path/to/saved/model`, or the path of
            a directory written by `dalle.clip.save_clip`.
        tokenizer: the project tokenizer; needed for our own CLIP, ignored for `hf:`.
        device: where to run the model.
    """
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return HFCLIPScorer(spec[len(HF_PREFIX):], device=device)
    if tokenizer is None:
        raise DalleError(f"scoring with the CLIP in {spec} needs the project tokenizer it was trained with")
    return CLIPScorer(load_clip(spec, device=device), tokenizer, device=device)
