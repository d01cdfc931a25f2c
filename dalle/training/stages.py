"""The three training stages, each a plain function: data in, a model directory out.

`train_dvae`, `train_clip` and `train_transformer` build their model from the config,
turn the data source into deterministic batches (`dalle.training.batches`), and hand both
with a step function to the one loop, `dalle.training.loop.fit`. They write into the run
directory, which is also the pipeline directory that `dalle.load_pipeline` reads:

  run_dir/tokenizer.json, run_dir/dvae/, run_dir/clip/, run_dir/transformer/

They do not evaluate what they trained: the CLI and the demo compose "train, then
evaluate" (`dalle.evaluation.stages`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle.checkpoint import atomic_directory
from dalle.config import Config
from dalle.data import shapes
from dalle.data.sources import open_source, take
from dalle.errors import DalleError
from dalle.images import to_float
from dalle.inference.pipeline import write_sampling_defaults
from dalle.models.clip import CLIP
from dalle.models.dvae import DVAE, encode, kl_weight_at, load_dvae, temperature_at
from dalle.models.transformer import DalleTransformer, drop_captions
from dalle.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, train_bpe
from dalle.training.batches import MappedBatches, TableBatches, image_caption_batches
from dalle.training.loop import FitResult, fit
from dalle.training.preview import sample_preview

log = logging.getLogger(__name__)


def _summary(result: FitResult) -> dict[str, Any]:
    summary: dict[str, Any] = {"train_seconds": round(result.seconds, 1), "steps": result.steps,
                               "last_loss": result.last_loss}
    if result.stopped_early:
        summary["stopped_early"] = True
    return summary


# ----------------------------------------------------------------------------- tokenizer


def prepare_tokenizer(config: Config, retrain: bool = False) -> Tokenizer:
    """The run's tokenizer: run_dir/tokenizer.json, copied from tokenizer.path or trained."""
    run_dir = Path(config.run_dir)
    target = run_dir / TOKENIZER_FILE
    if not target.is_file() or retrain:
        run_dir.mkdir(parents=True, exist_ok=True)
        source = Path(config.tokenizer.path)
        if source.is_file() and not retrain:
            shutil.copyfile(source, target)
        else:
            data = replace(config.data, paraphrase_prob=max(config.data.paraphrase_prob, 0.2))
            limit = 5000 if data.source == "shapes" else (config.data.n or None)
            pairs = take(open_source(data.source, data, n=limit), limit or 10**9)
            captions = [caption for _, caption in pairs]
            train_bpe(captions, config.tokenizer.vocab_size).save(str(target))
    return load_tokenizer(target, config.tokenizer.text_len)


# ----------------------------------------------------------------------------- every stage


STAGES = ("tokenizer", "dvae", "clip", "transformer")


def is_trained(config: Config, stage: str) -> bool:
    """Whether the run directory already holds this stage's result."""
    run_dir = Path(config.run_dir)
    return (run_dir / TOKENIZER_FILE).is_file() if stage == "tokenizer" else (run_dir / stage / "config.json").is_file()


def train_all(config: Config, progress: bool = True, retrain_tokenizer: bool = False) -> dict[str, dict[str, Any]]:
    """Trains every stage of `config` that its run directory does not hold yet, in order; resumable.

    The tokenizer is copied from `tokenizer.path` (trained on the captions when that file is
    missing, or when `retrain_tokenizer`); the dVAE is copied from `dvae.pretrained` when set.
    Returns, per stage trained now, its summary with `seconds`; stages already there are left
    out. A killed run resumes each stage from its last checkpoint when called again.
    """
    done: dict[str, dict[str, Any]] = {}
    work = {"tokenizer": lambda: prepare_tokenizer(config, retrain=retrain_tokenizer) and {},
            "dvae": lambda: use_pretrained_dvae(config) if config.dvae.pretrained else train_dvae(config,
                                                                                                progress=progress),
            "clip": lambda: train_clip(config, progress=progress),
            "transformer": lambda: train_transformer(config, progress=progress)}
    for stage in STAGES:
        if is_trained(config, stage):
            log.info("[%s] already trained in %s, kept", stage, config.run_dir)
            continue
        started = time.perf_counter()
        summary = dict(work[stage]() or {})
        summary["seconds"] = round(time.perf_counter() - started, 1)
        done[stage] = summary
        log.info("[%s] %s s", stage, summary["seconds"])
    return done


def use_pretrained_dvae(config: Config) -> dict[str, Any]:
    """Copies the converted dVAE of `dvae.pretrained` into the run as run_dir/dvae (checked first)."""
    source = Path(config.dvae.pretrained)
    dvae = load_dvae(source)  # a one-line error if it is not a dVAE directory
    if dvae.config.image_size != config.data.size:
        raise DalleError(f"the pretrained dVAE in {source} reads {dvae.config.image_size}-px pictures, "
                         f"data.size is {config.data.size}")
    with atomic_directory(Path(config.run_dir) / "dvae") as tmp:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
    return {"pretrained": str(source), "grid": dvae.config.grid_size, "codebook_size": dvae.config.codebook_size}


# ----------------------------------------------------------------------------- dVAE


def train_dvae(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Trains the dVAE on the data's images and writes run_dir/dvae; returns the run's summary."""
    if config.dvae.image_size != config.data.size:
        raise DalleError(f"dvae.image_size ({config.dvae.image_size}) must equal data.size ({config.data.size})")
    train = config.train.dvae
    torch.manual_seed(train.seed)
    # channels_last: the CPU's oneDNN convolutions run about 1.2x faster on it.
    model = DVAE(config.dvae).to(memory_format=torch.channels_last)
    batches = image_caption_batches(config, train, progress)

    def step_fn(model, batch, step):
        images = to_float(batch["images"]).contiguous(memory_format=torch.channels_last)
        out = model(images, temperature_at(config.dvae, step), kl_weight_at(config.dvae, step))
        return {k: v for k, v in out.items() if k in ("loss", "recon_loss", "kl")}

    result = fit(model, batches, step_fn, train, config.run_dir, "dvae", resume=resume,
                 items_per_batch=lambda b: len(b["images"]), progress=progress, stop_after=stop_after)
    return _summary(result)


# ----------------------------------------------------------------------------- CLIP


def train_clip(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Trains a CLIP on the data's (image, caption) pairs and writes run_dir/clip."""
    tokenizer = prepare_tokenizer(config)
    clip_config = replace(config.clip, text_len=tokenizer.text_len, text_vocab=tokenizer.total_vocab,
                          image_size=config.data.size)
    train = config.train.clip
    torch.manual_seed(train.seed)
    model = CLIP(clip_config)
    batches = image_caption_batches(config, train, progress)

    hard_negatives = clip_config.hard_negatives and config.data.source == "shapes"
    twin_pairs = shapes.TRAIN_PAIRS if config.data.split == "train" else None  # no held-out pair, even as a negative

    def step_fn(model, batch, step):
        negatives = None
        if hard_negatives:  # seeded by the step, so a resumed run draws the same twins
            rng = np.random.default_rng([train.seed, step])
            twins = [t for t in (shapes.false_twin(c, rng, pairs=twin_pairs) for c in batch["captions"])
                     if t is not None]
            negatives = tokenizer.encode(twins) if twins else None
        out = model(tokenizer.encode(batch["captions"]), to_float(batch["images"]), negatives)
        return {"loss": out["loss"]}

    result = fit(model, batches, step_fn, train, config.run_dir, "clip", resume=resume,
                 items_per_batch=lambda b: len(b["images"]), progress=progress, stop_after=stop_after)
    return _summary(result)


# ----------------------------------------------------------------------------- transformer


def train_transformer(config: Config, resume: str | None = "auto", progress: bool = True,
                      stop_after: int | None = None):
    """Trains the transformer on (caption, frozen-dVAE codes) and writes run_dir/transformer."""
    run_dir = Path(config.run_dir)
    if not (run_dir / "dvae" / "config.json").is_file():
        raise DalleError(f"no trained dVAE in {run_dir / 'dvae'}: run `dalle train-vae` with this run_dir first")
    dvae = load_dvae(run_dir / "dvae")
    tokenizer = prepare_tokenizer(config)
    train_tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, tokenizer.text_len, config.tokenizer.bpe_dropout)
    model_config = replace(config.transformer, text_len=tokenizer.text_len, text_vocab=tokenizer.total_vocab,
                           image_vocab=dvae.config.codebook_size, image_grid=dvae.config.grid_size)
    train = config.train.transformer
    torch.manual_seed(train.seed)
    model = DalleTransformer(model_config)

    def codes_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: these codes are inputs of autograd later
            return encode(dvae, to_float(images)).flatten(1)  # (B, h*w)

    batches = image_caption_batches(config, train, progress)
    if isinstance(batches, TableBatches):  # a fixed table: encode every picture once
        images = batches.columns["images"]
        codes = torch.cat([codes_of(images[i : i + 256]) for i in
                           tqdm(range(0, len(images), 256), desc="encoding images", disable=not progress,
                                leave=False)])
        batches = TableBatches({"codes": codes, "captions": batches.columns["captions"]}, train.batch_size,
                               train.seed)
    else:  # endless or streaming: encode each batch as it comes
        batches = MappedBatches(batches, lambda b: {"codes": codes_of(b["images"]), "captions": b["captions"]})

    def step_fn(model, batch, step):
        text = drop_captions(train_tokenizer.encode(batch["captions"]), model_config.caption_dropout,
                             text_vocab=model_config.text_vocab)
        out = model(text, batch["codes"])
        return {k: out[k] for k in ("loss", "text_loss", "image_loss")}

    write_sampling_defaults(run_dir, config.sampling)  # how the pipeline samples unless told otherwise
    tokens = model_config.text_len + model_config.image_grid**2
    preview = sample_preview(config, tokenizer, dvae, run_dir, train.sample_every)
    result = fit(model, batches, step_fn, train, run_dir, "transformer", resume=resume,
                 items_per_batch=lambda b: len(b["codes"]) * tokens, on_log=preview, progress=progress,
                 stop_after=stop_after)
    return _summary(result)
