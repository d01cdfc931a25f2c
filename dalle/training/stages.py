"""The training stages, each a plain function: data in, a model directory out.

`train_dvae` (or `train_vqgan`, as `image_tokenizer` says), `train_clip` and
`train_transformer` build their model from the config, turn the data source into
deterministic batches (`dalle.training.batches`), and hand both with a step function to the
one loop, `dalle.training.loop.fit`. They write into the run directory, which is also the
pipeline directory that `dalle.load_pipeline` reads:

  run_dir/tokenizer.json, run_dir/dvae/ (or run_dir/vqgan/), run_dir/clip/, run_dir/transformer/

`train_judge` fine-tunes run_dir/clip into run_dir/judge, which only `dalle imagine` reads.

They do not evaluate what they trained: the CLI and the demo compose "train, then
evaluate" (`dalle.evaluation.stages`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dalle.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    CheckpointError,
    atomic_directory,
    read_model_meta,
    write_text_atomic,
)
from dalle.config import Config
from dalle.config_io import to_dict
from dalle.data import shapes
from dalle.data.sources import open_source, take
from dalle.errors import DalleError
from dalle.images import to_float
from dalle.inference.pipeline import write_sampling_defaults
from dalle.models.clip import CLIP, load_clip, save_clip
from dalle.models.dvae import DVAE, kl_weight_at, temperature_at
from dalle.models.image_tokenizer import KINDS, load_image_tokenizer
from dalle.models.transformer import DalleTransformer, drop_captions
from dalle.models.vqgan import VQGAN, save_vqgan, to_signed
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
            write_text_atomic(target, source.read_text(encoding="utf-8"))
        else:
            data = replace(config.data, paraphrase_prob=max(config.data.paraphrase_prob, 0.2))
            limit = 5000 if data.source == "shapes" else (config.data.n or None)
            pairs = take(open_source(data.source, data, n=limit), limit or 10**9)
            captions = [caption for _, caption in pairs]
            write_text_atomic(target, train_bpe(captions, config.tokenizer.vocab_size).to_str(pretty=True))
    return load_tokenizer(target, config.tokenizer.text_len)


# ----------------------------------------------------------------------------- every stage


def stage_names(config: Config) -> tuple[str, ...]:
    """The stages of a run, in order; the image tokenizer's is its kind (its directory): dvae or vqgan."""
    return ("tokenizer", config.image_tokenizer, "clip", "transformer")


def is_trained(config: Config, stage: str) -> bool:
    """Whether the run directory already holds this stage's result; a stage directory that is
    there but damaged (its config.json unreadable or of another kind, no weights) is an error
    that names it, not a stage taken as trained."""
    run_dir = Path(config.run_dir)
    if stage == "tokenizer":
        return (run_dir / TOKENIZER_FILE).is_file()
    directory = run_dir / stage
    if not (directory / CONFIG_FILE).is_file():
        return False
    try:
        read_model_meta(directory, stage)
        if not ((directory / WEIGHTS_FILE).is_file() or (directory / WEIGHTS_INDEX).is_file()):
            raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")
    except CheckpointError as error:
        raise DalleError(f"{error}; remove {directory} to train this stage again") from None
    return True


def train_all(config: Config, progress: bool = True, retrain_tokenizer: bool = False) -> dict[str, dict[str, Any]]:
    """Trains every stage of `config` that its run directory does not hold yet, in order; resumable.

    The tokenizer is copied from `tokenizer.path` (trained on the captions when that file is
    missing, or when `retrain_tokenizer`); the image tokenizer is copied from `dvae.pretrained`
    (`vqgan.pretrained`) when set. Returns, per stage trained now, its summary with `seconds`;
    stages already there are left out. A killed run resumes each stage from its last checkpoint
    when called again.
    """
    kind = config.image_tokenizer
    other = next(k for k in KINDS if k != kind)
    if (Path(config.run_dir) / other).exists():  # its CLIP and transformer would be kept as if trained for this one
        raise DalleError(f"{config.run_dir} holds a {other}, the config's image_tokenizer is {kind}: "
                         "use another --run-dir")
    done: dict[str, dict[str, Any]] = {}
    work = {"tokenizer": lambda: prepare_tokenizer(config, retrain=retrain_tokenizer) and {},
            kind: lambda: (use_pretrained(config) if pretrained_of(config)
                           else train_image_tokenizer(config, progress=progress)),
            "clip": lambda: train_clip(config, progress=progress),
            "transformer": lambda: train_transformer(config, progress=progress)}
    for stage in stage_names(config):
        if is_trained(config, stage):
            log.info("[%s] already trained in %s, kept", stage, config.run_dir)
            continue
        started = time.perf_counter()
        summary = dict(work[stage]() or {})
        summary["seconds"] = round(time.perf_counter() - started, 1)
        done[stage] = summary
        log.info("[%s] %s s", stage, summary["seconds"])
    return done


def pretrained_of(config: Config) -> str:
    """The converted image tokenizer the config names (`dvae.pretrained` or `vqgan.pretrained`); "" if none."""
    return config.vqgan.pretrained if config.image_tokenizer == "vqgan" else config.dvae.pretrained


def use_pretrained(config: Config) -> dict[str, Any]:
    """Copies the converted image tokenizer of `dvae.pretrained` (`vqgan.pretrained`) into the run
    as run_dir/dvae (run_dir/vqgan), checked first."""
    source, kind = Path(pretrained_of(config)), config.image_tokenizer
    model = load_image_tokenizer(source)  # a one-line error if it is not a model directory
    if model.kind != kind:
        raise DalleError(f"{kind}.pretrained names a {model.kind} ({source}); image_tokenizer is {kind}")
    if model.image_size != config.data.size:
        raise DalleError(f"the pretrained {kind} in {source} reads {model.image_size}-px pictures, "
                         f"data.size is {config.data.size}")
    with atomic_directory(Path(config.run_dir) / kind) as tmp:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
    return {"pretrained": str(source), "grid": model.grid, "codebook_size": model.codebook_size}


def train_image_tokenizer(config: Config, resume: str | None = "auto", progress: bool = True,
                          stop_after: int | None = None) -> dict[str, Any]:
    """Trains the run's image tokenizer: `train_dvae` or `train_vqgan`, as `image_tokenizer` says."""
    train = train_vqgan if config.image_tokenizer == "vqgan" else train_dvae
    return train(config, resume=resume, progress=progress, stop_after=stop_after)


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


# ----------------------------------------------------------------------------- VQGAN


class CodebookRestarts(nn.Module):
    """A VQGAN in training whose dead codes come back: a code unused for `after` steps in a row
    is moved onto a random encoder output of the batch, where it is used at once.

    The counts are a buffer, so a training checkpoint keeps them (a resumed run restarts the
    same codes); the VQGAN saved at the end is `self.model` alone. With several processes, the
    counts are summed over all of them and process 0's new codebook vectors are sent to all.
    """

    def __init__(self, model: VQGAN, after: int):
        super().__init__()
        self.model, self.config, self.after = model, model.config, after
        self.register_buffer("unused_steps", torch.zeros(model.codebook_size, dtype=torch.long))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.model.latents(to_signed(images))  # (B, D, h, w)
        restarted = self.restart(z.detach()) if self.training and self.after else 0
        out = self.model.losses(images, z)
        used = torch.bincount(out["codes"].flatten(), minlength=self.model.codebook_size)  # (K,)
        if self.training:
            if _distributed():
                dist.all_reduce(used)
            self.unused_steps.copy_(torch.where(used > 0, 0, self.unused_steps + 1))
        out["restarted"] = torch.tensor(float(restarted))
        out["codes_used"] = (used > 0).float().mean()
        return out

    @torch.no_grad()
    def restart(self, z: torch.Tensor) -> int:
        """Moves the codes unused for `after` steps onto random rows of z (B, D, h, w); returns how many."""
        dead = (self.unused_steps >= self.after).nonzero().flatten()  # (n,)
        if len(dead) == 0:
            return 0
        rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B*h*w, D)
        pick = (torch.randperm(len(rows), device=rows.device)[: len(dead)] if len(dead) <= len(rows)
                else torch.randint(len(rows), (len(dead),), device=rows.device))
        fresh = rows[pick].contiguous()  # (n, D)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.model.quantize.embedding.weight[dead] = fresh.to(self.model.quantize.embedding.weight.dtype)
        self.unused_steps[dead] = 0
        return len(dead)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def train_vqgan(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Trains the VQGAN (vq quantizer) on the data's images and writes run_dir/vqgan; returns the run's summary.

    The loss is pixel MSE + `edge_weight` * edge MSE + the quantizer's loss; codes unused for
    `dead_code_steps` steps restart (`CodebookRestarts`). No discriminator, no LPIPS."""
    c = config.vqgan
    if c.resolution != config.data.size:
        raise DalleError(f"vqgan.resolution ({c.resolution}) must equal data.size ({config.data.size})")
    if c.quantizer != "vq":
        raise DalleError("train-vae trains VQGANs with vqgan.quantizer: vq; a gumbel VQGAN is imported "
                         "(dalle convert vqgan) and named by vqgan.pretrained")
    train = config.train.vqgan
    torch.manual_seed(train.seed)
    model = CodebookRestarts(VQGAN(c), c.dead_code_steps)
    batches = image_caption_batches(config, train, progress)

    def step_fn(model, batch, step):
        out = model(to_float(batch["images"]))
        return {k: v for k, v in out.items() if k in ("loss", "recon_loss", "vq_loss", "edge_loss", "restarted",
                                                       "codes_used")}

    result = fit(model, batches, step_fn, train, config.run_dir, "vqgan", lambda m, d: save_vqgan(m.model, d),
                 resume=resume, items_per_batch=lambda b: len(b["images"]), progress=progress, stop_after=stop_after)
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

    def step_fn(model, batch, step):
        text_ids, images, negatives = _clip_inputs(config, clip_config, tokenizer, batch, step)
        return {"loss": model(text_ids, images, negatives)["loss"]}

    result = fit(model, batches, step_fn, train, config.run_dir, "clip", resume=resume,
                 items_per_batch=lambda b: len(b["images"]), progress=progress, stop_after=stop_after)
    return _summary(result)


def _clip_inputs(config: Config, clip_config, tokenizer: Tokenizer, batch: dict, step: int):
    """A CLIP batch as tensors: caption ids, pictures in [0, 1], and the false twins (shapes only) or None."""
    negatives = None
    if clip_config.hard_negatives and config.data.source == "shapes":
        rng = np.random.default_rng([config.train.clip.seed, step])  # seeded by the step: a resumed run draws the same
        pairs = shapes.TRAIN_PAIRS if config.data.split == "train" else None  # no held-out pair, even as a negative
        twins = [t for t in (shapes.false_twin(c, rng, pairs=pairs) for c in batch["captions"]) if t is not None]
        negatives = tokenizer.encode(twins) if twins else None
    images = to_float(batch["images"])
    negatives = negatives.to(images.device) if negatives is not None else None
    return tokenizer.encode(batch["captions"]).to(images.device), images, negatives


def train_judge(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Fine-tunes the run's CLIP on adversarial pictures and writes run_dir/judge, `dalle imagine`'s default judge.

    Each step first finds, for every picture of the batch, the change within an L2 ball of
    radius `judge.eps` that most raises the contrastive loss (`judge.attack_steps` projected
    gradient steps), then trains on the changed pictures plus `judge.clean_weight` times the
    plain loss. Such a model's gradients point towards whole objects, not towards pixels
    that fool it, which is what imagine climbs. The last `judge.final_steps` updates attack
    within `judge.final_eps`. With `judge.shape_twins` each caption also
    meets its picture's shape twin (`dalle.data.twin_pictures`) as a wrong picture.
    """
    run_dir = Path(config.run_dir)
    if not (run_dir / "clip" / CONFIG_FILE).exists():
        raise DalleError(f"{run_dir / 'clip'} is missing: train the CLIP first (dalle train-clip)")
    tokenizer = prepare_tokenizer(config)
    model = load_clip(run_dir / "clip")
    clip_config = model.config
    train = config.train.judge
    torch.manual_seed(train.seed)
    judge = config.judge
    batches = image_caption_batches(config, train, progress, twins=judge.shape_twins)

    def attack(model, text_ids, images, negatives, eps):
        delta, step_size = torch.zeros_like(images), 2.5 * eps / judge.attack_steps
        for _ in range(judge.attack_steps):
            delta.requires_grad_(True)
            loss = model(text_ids, (images + delta).clamp(0, 1), negatives)["loss"]
            (grad,) = torch.autograd.grad(loss, delta)
            delta = delta.detach() + step_size * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * (eps / norm.clamp_min(eps))  # back into the ball
        return (images + delta).clamp(0, 1).detach()

    def step_fn(model, batch, step):
        text_ids, images, negatives = _clip_inputs(config, clip_config, tokenizer, batch, step)
        model.eval()  # the attack sees the model as it is; autograd.grad(loss, delta) leaves the weights' .grad alone
        eps = judge.final_eps if step >= train.steps - judge.final_steps else judge.eps
        changed = attack(model, text_ids, images, negatives, eps)
        model.train()
        twins = {}
        if judge.shape_twins:  # the attack leaves them alone; the losses below see them as wrong pictures
            twins = {"negative_images": to_float(batch["twin_images"]).to(images.device),
                     "negative_image_ids": tokenizer.encode(batch["twin_captions"]).to(images.device)}
        adversarial = model(text_ids, changed, negatives, **twins)["loss"]
        clean = model(text_ids, images, negatives, **twins)["loss"] if judge.clean_weight else torch.zeros(())
        return {"loss": adversarial + judge.clean_weight * clean, "adversarial": adversarial.detach(),
                "clean": clean.detach(), "eps": torch.tensor(eps)}

    result = fit(model, batches, step_fn, train, config.run_dir, "judge", save_fn=save_clip,
                 resume=resume, items_per_batch=lambda b: len(b["images"]), progress=progress, stop_after=stop_after,
                 stage_settings={f"judge.{key}": value for key, value in to_dict(judge).items()})
    return _summary(result)


# ----------------------------------------------------------------------------- transformer


def train_transformer(config: Config, resume: str | None = "auto", progress: bool = True,
                      stop_after: int | None = None):
    """Trains the transformer on (caption, frozen image tokenizer's codes) and writes run_dir/transformer."""
    run_dir = Path(config.run_dir)
    image_dir = run_dir / config.image_tokenizer
    if not (image_dir / "config.json").is_file():
        raise DalleError(f"no trained {config.image_tokenizer} in {image_dir}: run `dalle train-vae` with this "
                         "run_dir first")
    # On this process's GPU when there is one: encoding 256-px photos batch by batch on the host CPU
    # would starve it. (Not through accelerate's PartialState: initialising it before `fit` resets
    # its state made two CPU processes both take the main process's lock.)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    image_tokenizer = load_image_tokenizer(image_dir).to(device)
    tokenizer = prepare_tokenizer(config)
    train_tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, tokenizer.text_len, config.tokenizer.bpe_dropout)
    model_config = replace(config.transformer, text_len=tokenizer.text_len, text_vocab=tokenizer.total_vocab,
                           image_vocab=image_tokenizer.codebook_size, image_grid=image_tokenizer.grid)
    train = config.train.transformer
    torch.manual_seed(train.seed)
    model = DalleTransformer(model_config)

    def codes_of(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: these codes are inputs of autograd later
            return image_tokenizer.encode(to_float(images)).flatten(1)  # (B, h*w)

    batches = image_caption_batches(config, train, progress)
    if isinstance(batches, TableBatches):  # a fixed table: encode every picture once
        images = batches.columns["images"]
        codes = torch.cat([codes_of(images[i : i + 256]).cpu() for i in
                           tqdm(range(0, len(images), 256), desc="encoding images", disable=not progress,
                                leave=False)])
        batches = TableBatches({"codes": codes, "captions": batches.columns["captions"]}, train.batch_size,
                               train.seed)
    else:  # endless or streaming: encode each batch as it comes
        batches = MappedBatches(batches, lambda b: {"codes": codes_of(b["images"]), "captions": b["captions"]})

    def step_fn(model, batch, step):
        text = drop_captions(train_tokenizer.encode(batch["captions"]), model_config.caption_dropout,
                             text_vocab=model_config.text_vocab)
        out = model(text.to(batch["codes"].device), batch["codes"])
        return {k: out[k] for k in ("loss", "text_loss", "image_loss")}

    write_sampling_defaults(run_dir, config.sampling)  # how the pipeline samples unless told otherwise
    tokens = model_config.text_len + model_config.image_grid**2
    preview = sample_preview(config, tokenizer, image_tokenizer, run_dir, train.sample_every)
    result = fit(model, batches, step_fn, train, run_dir, "transformer", resume=resume,
                 items_per_batch=lambda b: len(b["codes"]) * tokens, on_log=preview, progress=progress,
                 stop_after=stop_after)
    return _summary(result)
