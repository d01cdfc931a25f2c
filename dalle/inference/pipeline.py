"""The inference path: prompts -> tokens -> transformer -> image codes -> dVAE -> CLIP -> ranked pictures.

`load_pipeline(dir)` reads a pipeline directory (what training writes into its run
directory): `tokenizer.json`, `dvae/`, `transformer/` and, optionally, `clip/`. It checks
that the stages fit together before anything runs. This module imports no training code
(no accelerate, no datasets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dalle.checkpoint import CheckpointError, write_json_atomic
from dalle.config import ConfigError, SamplingConfig, check_sampling, from_dict, to_dict
from dalle.errors import DalleError
from dalle.images import pil_to_tensor, tensor_to_pil
from dalle.inference.hf_clip import HFCLIPScorer
from dalle.inference.sampling import sample_image_codes
from dalle.inference.scoring import CLIPScorer, Scorer, rerank
from dalle.models.clip import load_clip
from dalle.models.dvae import DVAE, decode, encode, load_dvae
from dalle.models.transformer import DalleTransformer, load_transformer
from dalle.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

HF_PREFIX = "hf:"  # --clip hf:NAME_OR_DIR: a Hugging Face CLIP
MAX_CANDIDATES = 10_000  # pictures sampled per prompt, at most
MAX_PROMPT_CHARS = 1_000
MAX_SEED = 2**63 - 1
SAMPLING_FILE = "sampling.json"  # the pipeline's default sampling settings (a SamplingConfig)


@dataclass
class Sample:
    """One kept picture of a prompt."""

    image: Image.Image
    rank: int  # 1-based: 1 is CLIP's favourite (or the first sampled, without reranking)
    clip_score: float | None
    candidate: int  # its index in sampling order


class Pipeline:
    """Tokenizer + transformer + dVAE (+ CLIP): call it with prompts to get ranked pictures."""

    def __init__(self, tokenizer: Tokenizer, transformer: DalleTransformer, dvae: DVAE, scorer: Scorer | None,
                 directory: Path | None = None, sampling: SamplingConfig | None = None):
        check_fit(tokenizer, transformer, dvae, scorer)
        self.tokenizer, self.transformer, self.dvae, self.scorer = tokenizer, transformer, dvae, scorer
        self.directory = directory
        self.sampling = sampling or SamplingConfig()  # what a call uses for the options it leaves out

    @property
    def image_size(self) -> int:
        return self.dvae.config.image_size

    def encode_prime(self, image: Image.Image | str | Path, rows: int) -> torch.Tensor:
        """The first `rows` grid rows of an image's codes, for priming: (1, rows * grid)."""
        if not isinstance(image, Image.Image):
            try:
                image = Image.open(image).convert("RGB")
            except (OSError, ValueError) as error:
                raise DalleError(f"cannot read the priming image {image}: {error}") from None
        grid = self.dvae.config.grid_size
        if not 0 < rows < grid:
            raise DalleError(f"prime rows must be between 1 and {grid - 1}, got {rows}")
        pixels = pil_to_tensor(image, self.image_size)[None]  # (1, 3, S, S)
        return encode(self.dvae, pixels).flatten(1)[:, : rows * grid]  # (1, rows * grid)

    def __call__(self, prompts: list[str] | str, *, candidates: int = 8, keep: int = 1, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cond_scale: float | None = None, prime_image: Image.Image | str | Path | None = None,
                 prime_rows: int = 0, rerank_with_clip: bool = True, batch_size: int | None = None
                 ) -> list[list[Sample]]:
        """Samples `candidates` pictures per prompt and keeps the best `keep`.

        Args:
            prompts: captions (an empty one samples with no caption).
            candidates: pictures sampled per prompt.
            keep: how many to return per prompt, best first.
            seed: prompt i is sampled with seed + i, so results repeat.
            temperature, top_k, top_p: sampling filters (top_k 0 or top_p 1: off).
            cond_scale: classifier-free guidance scale (1: off).
            Left out (None), each of these four takes the pipeline's default
            (`self.sampling`, read from the directory's sampling.json).
            prime_image, prime_rows: complete a picture whose top rows are given.
            rerank_with_clip: order by CLIP score; False keeps sampling order (scores are
                still given when the pipeline has a CLIP).
            batch_size: at most this many rows per transformer call.

        Returns:
            Per prompt, `keep` Samples, best first.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        check_request(prompts, candidates, keep, seed)
        try:
            check_sampling(temperature, top_k, top_p, cond_scale)
        except ConfigError as error:
            raise DalleError(f"sampling: {error}") from None
        if rerank_with_clip and self.scorer is None:
            raise DalleError("this pipeline has no CLIP to rerank with: use --rerank none or --clip hf:NAME")
        defaults = self.sampling
        temperature = defaults.temperature if temperature is None else temperature
        top_k = (defaults.top_k if top_k is None else top_k) or None  # 0: off
        top_p = defaults.top_p if top_p is None else top_p
        cond_scale = defaults.cond_scale if cond_scale is None else cond_scale
        prime = self.encode_prime(prime_image, prime_rows) if prime_image is not None else None
        results = []
        for index, prompt in enumerate(prompts):
            text = self.tokenizer.encode([prompt])  # (1, L)
            codes = sample_image_codes(self.transformer, text, num_candidates=candidates, temperature=temperature,
                                       top_k=top_k, top_p=top_p, cond_scale=cond_scale, prime=prime,
                                       seed=seed + index, batch_size=batch_size)  # (candidates, N)
            grid = self.dvae.config.grid_size
            with torch.inference_mode():
                pixels = decode(self.dvae, codes.view(-1, grid, grid))  # (candidates, 3, S, S)
            order, scores = list(range(candidates)), None
            if self.scorer is not None:  # scores are reported even when the order is kept
                ranked, scores = rerank(self.scorer, prompt, pixels)
                scores = scores.tolist()
                if rerank_with_clip:
                    order = ranked.tolist()
            results.append([Sample(tensor_to_pil(pixels[i]), rank + 1, scores[i] if scores else None, i)
                            for rank, i in enumerate(order[:keep])])
        return results


def check_request(prompts: list[str], candidates: int, keep: int, seed: int) -> None:
    """Names the first thing wrong with a request (the same limits for the CLI and the API)."""
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise DalleError(f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}")
    if not 1 <= keep <= candidates:
        raise DalleError(f"keep must be in [1, candidates = {candidates}], got {keep}")
    if not 0 <= seed <= MAX_SEED - len(prompts):
        raise DalleError(f"seed must be in [0, 2**63 - 1 - prompts], got {seed}")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise DalleError(f"a prompt must be text, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise DalleError(f"a prompt may have at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")


def check_fit(tokenizer: Tokenizer, transformer: DalleTransformer, dvae: DVAE, scorer: Scorer | None) -> None:
    """Names the first way the stages do not fit together."""
    t, d = transformer.config, dvae.config
    if t.text_vocab != tokenizer.total_vocab:
        raise CheckpointError(f"the transformer expects a text vocabulary of {t.text_vocab}, the tokenizer gives "
                              f"{tokenizer.total_vocab} ({tokenizer.vocab_size} BPE + {tokenizer.text_len} padding)")
    if t.image_vocab != d.codebook_size:
        raise CheckpointError(f"the transformer expects {t.image_vocab} image codes, the dVAE has a codebook of "
                              f"{d.codebook_size}")
    if t.image_grid != d.grid_size:
        raise CheckpointError(f"the transformer expects a {t.image_grid}x{t.image_grid} code grid, the dVAE makes "
                              f"{d.grid_size}x{d.grid_size}")
    if isinstance(scorer, CLIPScorer):  # our CLIP reads captions with its own tokenizer (maybe another length)
        c, clip_tokenizer = scorer.model.config, scorer.tokenizer
        if c.text_vocab != clip_tokenizer.total_vocab or c.text_len != clip_tokenizer.text_len:
            raise CheckpointError(f"the CLIP expects {c.text_len} text tokens from a vocabulary of {c.text_vocab}, "
                                  f"its tokenizer gives {clip_tokenizer.text_len} from {clip_tokenizer.total_vocab}")


def load_pipeline(directory: str | Path, clip: str | None = None, device: str | torch.device = "cpu") -> Pipeline:
    """Loads a pipeline directory.

    Args:
        directory: holds tokenizer.json, dvae/, transformer/ and optionally clip/.
        clip: another CLIP to rerank with: `hf:NAME_OR_DIR` or a CLIP model directory.
        device: where the models run.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"pipeline directory not found: {directory}")
    for part in (TOKENIZER_FILE, "dvae", "transformer"):
        if not (directory / part).exists():
            raise CheckpointError(f"{directory} is not a pipeline directory: {part} is missing")
    transformer = load_transformer(directory / "transformer").to(device)
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE, transformer.config.text_len)
    dvae = load_dvae(directory / "dvae").to(device)
    scorer = None
    if clip is not None or (directory / "clip").is_dir():
        scorer = load_scorer_for(directory, clip, device=device)
    return Pipeline(tokenizer, transformer, dvae, scorer, directory, read_sampling_defaults(directory))


def write_sampling_defaults(directory: str | Path, sampling: SamplingConfig) -> Path:
    """Writes a pipeline directory's default sampling settings (sampling.json)."""
    path = Path(directory) / SAMPLING_FILE
    write_json_atomic(path, to_dict(sampling))
    return path


def read_sampling_defaults(directory: str | Path) -> SamplingConfig:
    """A pipeline directory's sampling.json; the built-in defaults when there is none."""
    path = Path(directory) / SAMPLING_FILE
    if not path.is_file():
        return SamplingConfig()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON: {error}") from None
    try:
        return from_dict(SamplingConfig, values, source=str(path))
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


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
