"""The inference path: prompts -> tokens -> transformer -> image codes -> image tokenizer -> CLIP -> ranked pictures.

`load_pipeline(dir)` reads a pipeline directory (what training writes into its run
directory): `tokenizer.json`, the image tokenizer (`dvae/` or `vqgan/`), `transformer/` and,
optionally, `clip/`. It checks that the stages fit together before anything runs. This
module imports no training code (no accelerate, no datasets).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dalle.checkpoint import CONFIG_FILE, CheckpointError, read_model_meta, write_json_atomic
from dalle.config import SamplingConfig, check_sampling
from dalle.config_io import ConfigError, from_dict, to_dict
from dalle.errors import DalleError
from dalle.images import pil_to_tensor, tensor_to_pil
from dalle.inference.devices import precision_label, resolve_device, resolve_dtype, run_label
from dalle.inference.editing import read_picture, region_to_codes
from dalle.inference.hf_clip import HFCLIPScorer
from dalle.inference.hub import SAMPLING_FILE, push_pipeline, save_pipeline, snapshot_of
from dalle.inference.imagine import Imagined, imagine
from dalle.inference.sampling import sample_image_codes
from dalle.inference.scorers import HF_PREFIX, load_scorer, load_scorer_for
from dalle.inference.scoring import CLIPScorer, Scorer, rerank
from dalle.models.image_tokenizer import NAMES, ImageTokenizer, image_tokenizer_dir, load_image_tokenizer
from dalle.models.transformer import DalleTransformer, load_transformer
from dalle.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

MAX_CANDIDATES = 10_000  # pictures sampled per prompt, at most
MAX_PROMPT_CHARS = 1_000
MAX_SEED = 2**63 - 1


@dataclass
class Sample:
    """One kept picture of a prompt."""

    image: Image.Image
    rank: int  # 1-based: 1 is CLIP's favourite (or the first sampled, without reranking)
    clip_score: float | None
    candidate: int  # its index in sampling order
    codes: torch.Tensor | None = None  # (N,) its image codes, raster order (to edit it again, say)


@dataclass
class Frame:
    """What `Pipeline.stream` yields: the candidates as far as they are sampled, then the ranked result."""

    images: list[Image.Image]  # one per candidate, in sampling order; rows not yet sampled are blank
    rows: int  # grid rows sampled so far
    samples: list[Sample] | None = None  # the ranked kept pictures, on the last frame only


@dataclass
class Settings:
    """The sampling settings of one call, with the pipeline's defaults filled in."""

    temperature: float
    top_k: int | None
    top_p: float | None
    cond_scale: float


class Pipeline:
    """Tokenizer + transformer + image tokenizer (dVAE or VQGAN) (+ CLIP): call it with prompts to get
    ranked pictures.

    Example:
        >>> import dalle
        >>> pipe = dalle.load_pipeline("runs/demo/model", device="auto", dtype="auto")
        >>> [samples] = pipe(["a red circle"], candidates=16, keep=4, seed=0)
        >>> samples[0].image.save("best.png")
    """

    def __init__(self, tokenizer: Tokenizer, transformer: DalleTransformer | None, image_tokenizer: ImageTokenizer,
                 scorer: Scorer | None, directory: Path | None = None, sampling: SamplingConfig | None = None,
                 judge: Scorer | None = None):
        check_fit(tokenizer, transformer, image_tokenizer, scorer)
        self.tokenizer, self.transformer, self.scorer = tokenizer, transformer, scorer
        self.judge = judge  # imagine's CLIP, from `dalle train-judge` (judge/), or None
        self.image_tokenizer = image_tokenizer
        self.directory = directory
        self.sampling = sampling or SamplingConfig()  # what a call uses for the options it leaves out
        self.compile = False  # decode with the compiled static step (`load_pipeline(compile=True)`)

    @property
    def dvae(self) -> ImageTokenizer:
        """The image tokenizer, by its first name (a dVAE, or a VQGAN in a VQ pipeline)."""
        return self.image_tokenizer

    @property
    def image_size(self) -> int:
        return self.image_tokenizer.image_size

    @property
    def grid(self) -> int:
        return self.image_tokenizer.grid

    @property
    def device(self) -> torch.device:
        if self.transformer is None:  # an imagine-only pipeline
            return next(self.image_tokenizer.parameters()).device
        return self.transformer.text_emb.weight.device

    def where(self) -> str:
        """`cpu, fp32, 2 threads` / `cuda:0, bf16`: where and how it runs, for progress lines."""
        return f"{self.device}, {run_label(self.device, precision_label(self.dtype))}"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.transformer is None else self.transformer.text_emb.weight.dtype

    def to(self, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto") -> Pipeline:
        """Moves the pipeline; the transformer runs in `dtype`, the image tokenizer and the CLIP stay in float32.

        The image tokenizer's decoder stays in float32 because its last layers turn logits into pixels,
        where half precision bands smooth gradients; it runs once per picture, so it costs
        little. The CLIP stays in float32 so that its scores do not depend on the dtype.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if self.transformer is not None:
            self.transformer.to(device=device, dtype=dtype)
        self.image_tokenizer.to(device)
        for scorer in (self.scorer, self.judge):
            if isinstance(scorer, CLIPScorer | HFCLIPScorer):
                scorer.model.to(device)
                scorer.device = device
        return self

    def encode_image(self, image: Image.Image | str | Path, what: str = "picture") -> torch.Tensor:
        """A picture's codes: (1, N) in raster order."""
        if not isinstance(image, Image.Image):
            image = read_picture(image, what)
        pixels = pil_to_tensor(image, self.image_size)[None].to(self.device)  # (1, 3, S, S)
        return self.image_tokenizer.encode(pixels).flatten(1)  # (1, N)

    def encode_prime(self, image: Image.Image | str | Path, rows: int) -> torch.Tensor:
        """The first `rows` grid rows of an image's codes, for priming: (1, rows * grid)."""
        if not 0 < rows < self.grid:
            raise DalleError(f"prime rows must be between 1 and {self.grid - 1}, got {rows}")
        return self.encode_image(image, "priming image")[:, : rows * self.grid]  # (1, rows * grid)

    def settings(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cond_scale: float | None = None) -> Settings:
        """The given sampling settings, checked, with the pipeline's defaults (sampling.json) for the rest."""
        check_sampling(temperature, top_k, top_p, cond_scale)  # a ConfigError (a DalleError) names the value
        defaults = self.sampling
        return Settings(defaults.temperature if temperature is None else temperature,
                        (defaults.top_k if top_k is None else top_k) or None,  # 0: off
                        defaults.top_p if top_p is None else top_p,
                        defaults.cond_scale if cond_scale is None else cond_scale)

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
        settings = self.settings(temperature, top_k, top_p, cond_scale)
        self._check_rerank(rerank_with_clip)
        kept = None
        if prime_image is not None:
            kept = self.encode_prime(prime_image, prime_rows)  # (1, k)
            kept = (torch.nn.functional.pad(kept, (0, self.grid**2 - kept.shape[1])), self._first(kept.shape[1]))
        results = []
        for index, prompt in enumerate(prompts):
            codes = self._sample(prompt, candidates, seed + index, settings, kept, batch_size=batch_size)
            results.append(self._rank(prompt, self._decode(codes), keep, rerank_with_clip, codes))
        return results

    def edit(self, image: Image.Image | str | Path, mask: Image.Image | str | Path | tuple[int, int, int, int],
             prompt: str, *, candidates: int = 8, keep: int = 1, seed: int = 0, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, cond_scale: float | None = None,
             rerank_with_clip: bool = True, batch_size: int | None = None) -> list[Sample]:
        """Redraws a region of a picture for a prompt; the codes outside the region are kept exactly.

        Args:
            image: the picture (resized to the model's size).
            mask: the region, as a box (x0, y0, x1, y1) in the picture's pixels, or a mask
                picture of the same size (white: redraw). A code is redrawn when any pixel
                of its cell is in the region. Outpainting is a region on a border.
            prompt: the caption of the whole edited picture.
            Other arguments as `__call__`.

        Returns:
            `keep` Samples, best first by CLIP on the whole picture.
        """
        check_request([prompt], candidates, keep, seed)
        settings = self.settings(temperature, top_k, top_p, cond_scale)
        self._check_rerank(rerank_with_clip)
        picture = image if isinstance(image, Image.Image) else read_picture(image, "picture to edit")
        redraw = region_to_codes(mask, picture.size, self.image_size, self.grid)  # (N,) bool
        codes = self.encode_image(picture)  # (1, N)
        codes = self._sample(prompt, candidates, seed, settings, (codes, ~redraw.to(self.device)), batch_size)
        return self._rank(prompt, self._decode(codes), keep, rerank_with_clip, codes)

    def stream(self, prompt: str, *, candidates: int = 8, keep: int = 1, seed: int = 0, every_rows: int = 1,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               cond_scale: float | None = None, rerank_with_clip: bool = True,
               batch_size: int | None = None) -> Iterator[Frame]:
        """`__call__` for one prompt, yielding the candidates as they form, every `every_rows` grid rows.

        Yields a `Frame` after each `every_rows` rows (and after the last row): the
        candidates decoded from the codes sampled so far, the rows below blank. The last
        frame also holds the ranked `samples`; its pictures are those `__call__` returns
        for the same arguments (the random numbers are drawn per position, up front).
        """
        check_request([prompt], candidates, keep, seed)
        if not 1 <= every_rows <= self.grid:
            raise DalleError(f"every_rows must be in [1, {self.grid}], got {every_rows}")
        settings = self.settings(temperature, top_k, top_p, cond_scale)
        self._check_rerank(rerank_with_clip)
        grid, codes, done = self.grid, None, 0
        for rows in range(every_rows, grid + every_rows, every_rows):
            rows = min(rows, grid)
            if codes is None:
                codes = self._sample(prompt, candidates, seed, settings, None, batch_size, stop=rows * grid)
            else:
                codes = self._continue(prompt, codes, done, seed, settings, batch_size, stop=rows * grid)
            done = rows * grid
            pixels = self._decode(codes)  # (C, 3, S, S)
            if rows < grid:
                pixels = pixels.clone()
                pixels[:, :, rows * self.image_size // grid:] = 1.0  # not sampled yet: blank
                yield Frame([tensor_to_pil(p) for p in pixels], rows)
            else:
                yield Frame([tensor_to_pil(p) for p in pixels], rows,
                            self._rank(prompt, pixels, keep, rerank_with_clip, codes))
            if rows == grid:
                return

    def imagine(self, prompt: str, *, steps: int = 100, seed: int = 0, init: str = "random",
                scorer: Scorer | None = None, lr: float = 0.2, cutouts: int = 8, smoothness: float | None = None,
                restarts: int = 8, frame_every: int = 0, progress: bool = True) -> Imagined:
        """A picture found by optimising the image tokenizer's codes for CLIP's score (`dalle.inference.imagine`).

        `init="sample"` starts from the transformer's best of 16 samples (one per restart);
        `scorer` defaults to the pipeline's judge (its `judge/`, from `dalle train-judge`) where
        it has one, else to its CLIP; `smoothness` defaults to 1 with the judge and 0 with a
        plain CLIP (as measured in docs/EXPERIMENTS.md). With `restarts` > 1 the pipeline's
        CLIP, when the judge guides, chooses among them."""
        ranker = None
        if scorer is None and self.judge is not None:
            scorer, ranker = self.judge, self.scorer
            smoothness = 1.0 if smoothness is None else smoothness
        scorer = scorer or self.scorer
        smoothness = 0.0 if smoothness is None else smoothness
        if scorer is None:
            raise DalleError("imagine needs a CLIP: this pipeline has none (pass --clip)")
        if init not in ("random", "sample"):
            raise DalleError(f"init must be random or sample, got {init!r}")
        check_request([prompt], 1, 1, seed)
        start = None
        if init == "sample":
            samples = self([prompt], candidates=max(16, restarts), keep=restarts, seed=seed)[0]
            start = torch.stack([sample.codes for sample in samples])  # (restarts, N)
        return imagine(self.image_tokenizer, scorer, prompt, steps=steps, seed=seed, init_codes=start, lr=lr,
                       cutouts=cutouts, smoothness=smoothness, restarts=restarts, ranker=ranker,
                       frame_every=frame_every, progress=progress)

    # ----------------------------------------------------------------------------- the Hub

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "2GB",
                        metrics: dict[str, Any] | None = None, grid: Image.Image | None = None) -> Path:
        """Writes the pipeline as a directory `load_pipeline` reads, with a model card (README.md).

        Weights above `max_shard_size` are split into safetensors shards with an index;
        `metrics` (from `dalle eval`) and a `grid` of samples go into the card."""
        self._need_transformer("be saved as a pipeline")
        clip_model, judge = (s.model if isinstance(s, CLIPScorer) else None for s in (self.scorer, self.judge))
        return save_pipeline(directory, self.tokenizer, self.transformer, self.image_tokenizer, clip_model,
                             self.sampling, self.directory, max_shard_size, metrics, grid, judge)

    def push_to_hub(self, repo: str, private: bool = False, token: str | None = None,
                    max_shard_size: int | str = "2GB", **card) -> str:
        """Uploads the pipeline to the Hub repository `repo` (USER/NAME); returns the repository URL."""
        with tempfile.TemporaryDirectory(prefix="dalle-push-") as staging:
            self.save_pretrained(Path(staging) / "pipeline", max_shard_size, **card)
            return push_pipeline(Path(staging) / "pipeline", repo, private, token)

    # ----------------------------------------------------------------------------- the steps of a call

    def _first(self, k: int) -> torch.Tensor:
        return torch.arange(self.grid**2, device=self.device) < k  # (N,)

    def _check_rerank(self, rerank_with_clip: bool) -> None:
        if rerank_with_clip and self.scorer is None:
            raise DalleError("this pipeline has no CLIP to rerank with: use --rerank none or --clip hf:NAME")

    def _sample(self, prompt: str, candidates: int, seed: int, settings: Settings,
                kept: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int | None = None,
                stop: int | None = None) -> torch.Tensor:
        """(candidates, N) codes; `kept` = ((1, N) codes, (N,) mask of the positions that keep them)."""
        self._need_transformer("sample")
        text = self.tokenizer.encode([prompt])  # (1, L)
        keep_codes, keep_mask = (None, None) if kept is None else kept
        return sample_image_codes(self.transformer, text, num_candidates=candidates, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p, cond_scale=settings.cond_scale,
                                  seed=seed, batch_size=batch_size, keep=keep_codes, keep_mask=keep_mask, stop=stop,
                                  compile_step=self.compile)

    def _continue(self, prompt: str, codes: torch.Tensor, done: int, seed: int, settings: Settings,
                  batch_size: int | None, stop: int) -> torch.Tensor:
        """Samples positions `done .. stop - 1` of every candidate in `codes` (C, N), as one call would have.

        One caption row per candidate with `num_candidates=1` is the same stream of rows,
        and so of random numbers, as one caption with `num_candidates=C`."""
        text = self.tokenizer.encode([prompt]).expand(len(codes), -1).contiguous()  # (C, L)
        return sample_image_codes(self.transformer, text, num_candidates=1, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p, cond_scale=settings.cond_scale,
                                  seed=seed, batch_size=batch_size, keep=codes, keep_mask=self._first(done),
                                  stop=stop, compile_step=self.compile)

    def _need_transformer(self, what: str) -> None:
        if self.transformer is None:
            raise DalleError(f"this pipeline has no transformer/, so it cannot {what}: it only imagines "
                             "(train one with `dalle train`)")

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(C, N) codes -> (C, 3, S, S) pixels in [0, 1], through the float32 image tokenizer's decoder."""
        with torch.inference_mode():
            return self.image_tokenizer.decode(codes.view(-1, self.grid, self.grid)).float()

    def _rank(self, prompt: str, pixels: torch.Tensor, keep: int, rerank_with_clip: bool,
              codes: torch.Tensor) -> list[Sample]:
        order, scores = list(range(len(pixels))), None
        if self.scorer is not None:  # scores are reported even when the order is kept
            ranked, scores = rerank(self.scorer, prompt, pixels)
            scores = scores.tolist()
            if rerank_with_clip:
                order = ranked.tolist()
        return [Sample(tensor_to_pil(pixels[i]), rank + 1, scores[i] if scores else None, i, codes[i].cpu())
                for rank, i in enumerate(order[:keep])]


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


def check_fit(tokenizer: Tokenizer, transformer: DalleTransformer | None, image_tokenizer: ImageTokenizer,
              scorer: Scorer | None) -> None:
    """Names the first way the stages do not fit together."""
    if transformer is not None:  # None: an imagine-only pipeline
        t, d = transformer.config, image_tokenizer
        kind = NAMES.get(d.kind, d.kind)
        if t.text_vocab != tokenizer.total_vocab:
            raise CheckpointError(f"the transformer expects a text vocabulary of {t.text_vocab}, the tokenizer gives "
                                  f"{tokenizer.total_vocab} ({tokenizer.vocab_size} BPE + {tokenizer.text_len} "
                                  "padding)")
        if t.image_vocab != d.codebook_size:
            raise CheckpointError(f"the transformer expects {t.image_vocab} image codes, the {kind} has a codebook "
                                  f"of {d.codebook_size}")
        if t.image_grid != d.grid:
            raise CheckpointError(f"the transformer expects a {t.image_grid}x{t.image_grid} code grid, the {kind} "
                                  f"makes {d.grid}x{d.grid}")
    if isinstance(scorer, CLIPScorer):  # our CLIP reads captions with its own tokenizer (maybe another length)
        c, clip_tokenizer = scorer.model.config, scorer.tokenizer
        if c.text_vocab != clip_tokenizer.total_vocab or c.text_len != clip_tokenizer.text_len:
            raise CheckpointError(f"the CLIP expects {c.text_len} text tokens from a vocabulary of {c.text_vocab}, "
                                  f"its tokenizer gives {clip_tokenizer.text_len} from {clip_tokenizer.total_vocab}")


def load_pipeline(directory: str | Path, clip: str | None = None, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = "auto", compile: bool = False) -> Pipeline:
    """Loads a pipeline directory, or `hf:USER/REPO` from the Hugging Face Hub (or its local cache).

    Args:
        directory: holds tokenizer.json, dvae/ (or vqgan/), transformer/ and optionally clip/
            and judge/; without transformer/ (a run before `dalle train`) it only imagines.
        clip: another CLIP to rerank with: `hf:NAME_OR_DIR` or a CLIP model directory.
        device: auto (CUDA when there is a GPU), cpu, cuda or cuda:N.
        dtype: the transformer's precision: auto (bf16 on a GPU; on the CPU bf16 where a start-up
            probe measures it faster, else float32), float32, bfloat16 or float16 (see `Pipeline.to`).
        compile: decode with the static-shape step under `torch.compile` (CUDA graphs on a
            GPU); the first call per batch size compiles.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    directory = snapshot_of(directory) if str(directory).startswith(HF_PREFIX) else Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"pipeline directory not found: {directory}")
    if not (directory / TOKENIZER_FILE).exists():
        raise CheckpointError(f"{directory} is not a pipeline directory: {TOKENIZER_FILE} is missing")
    clips = [directory / part for part in ("judge", "clip") if (directory / part / CONFIG_FILE).exists()]
    image_dir = image_tokenizer_dir(directory)  # dvae/ or vqgan/
    if (directory / "transformer").exists():
        transformer = load_transformer(directory / "transformer").to(device)
        text_len = transformer.config.text_len
    elif clips:  # an imagine-only run: the caption length is the CLIP's
        transformer, text_len = None, read_model_meta(clips[0], "clip")["config"]["text_len"]
    else:
        raise CheckpointError(f"{directory} is not a pipeline directory: transformer is missing")
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE, text_len)
    image_tokenizer = load_image_tokenizer(image_dir).to(device)
    scorer = None
    if clip is not None or (directory / "clip").is_dir():
        scorer = load_scorer_for(directory, clip, device=device)
    judge = None
    if (directory / "judge" / CONFIG_FILE).exists():
        judge = load_scorer(directory / "judge", tokenizer, device=device)
    pipeline = Pipeline(tokenizer, transformer, image_tokenizer, scorer, directory, read_sampling_defaults(directory),
                        judge)
    pipeline.compile = compile
    pipeline = pipeline.to(device, dtype)
    log.debug("[pipeline] %s on %s", directory, pipeline.where())
    return pipeline


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
