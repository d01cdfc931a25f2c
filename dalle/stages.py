"""The three training stages, each a plain function: data in, a model directory out.

`train_dvae`, `train_clip` and `train_transformer` build their model from the config,
turn the data source into deterministic batches, and hand both to the one loop in
`dalle.train.fit`. They write into the run directory, which is also the pipeline
directory that `dalle.load_pipeline` reads:

  run_dir/tokenizer.json, run_dir/dvae/, run_dir/clip/, run_dir/transformer/
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle import shapes
from dalle.config import Config, TrainConfig
from dalle.data import ShardedStream, open_source, take
from dalle.errors import DalleError
from dalle.tokenizer import Tokenizer, load_tokenizer, train_bpe
from dalle.train import FunctionBatches, MappedBatches, StreamBatches, TableBatches, fit

TOKENIZER_FILE = "tokenizer.json"
SAMPLE_PROMPTS = ["a red circle", "a small blue square in the top left", "a green triangle above a white circle"]
DIGIT_SAMPLE_PROMPTS = ["a handwritten zero", "a handwritten three", "a handwritten seven", "a handwritten nine"]


# ----------------------------------------------------------------------------- data


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 1]."""
    return images.float() / 255.0


def pil_to_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def load_table(config: Config, n: int | None = None, split: str | None = None, progress: bool = True):
    """Reads up to n pairs of the data source into memory: uint8 (N, 3, S, S) and captions."""
    data = replace(config.data, split=split or config.data.split)
    limit = n if n is not None else (config.data.n or None)
    if data.source == "shapes" and limit is None:
        raise DalleError("an in-memory table of the endless shapes source needs data.n > 0")
    source = open_source(data.source, data, n=limit)
    images, captions = [], []
    bar = tqdm(total=limit, desc=f"reading {data.source}", disable=not progress, leave=False)
    for image, caption in source:
        images.append(pil_to_uint8(image))
        captions.append(caption)
        bar.update(1)
        if limit and len(images) >= limit:
            break
    bar.close()
    if source.skipped:
        print(source.summary())
    if not images:
        raise DalleError(f"no usable pairs in {data.source}")
    total = len(images) + sum(source.skipped.values())
    bad = sum(source.skipped.values()) / max(1, total)
    if bad > config.data.max_bad_fraction:
        raise DalleError(f"{data.source}: {bad:.0%} of the files are broken (limit: data.max_bad_fraction = "
                         f"{config.data.max_bad_fraction})")
    return torch.stack(images), captions


def shapes_batch_maker(config: Config):
    """Endless shapes: item i of the training split, rendered on demand."""
    data = config.data

    def make(indices: list[int]) -> dict[str, Any]:
        pairs = [shapes.render(data.split, data.seed, i, data.size, data.paraphrase_prob, data.one_object_share)
                 for i in indices]
        return {"images": torch.stack([pil_to_uint8(p[0]) for p in pairs]), "captions": [p[1] for p in pairs]}

    return make


def is_streaming(config: Config) -> bool:
    return config.data.streaming or config.data.source.startswith("wds:")


def image_caption_batches(config: Config, train: TrainConfig, progress: bool = True):
    """Deterministic batches of {"images": uint8, "captions": list[str]} for a stage."""
    batch_size, seed = train.batch_size, train.seed
    if config.data.source == "shapes" and not config.data.n:
        return FunctionBatches(shapes_batch_maker(config), batch_size)
    if is_streaming(config):  # each process reads its own share: batch_size / processes rows
        from accelerate import PartialState

        state = PartialState()
        if batch_size % state.num_processes:
            raise DalleError(f"batch_size {batch_size} does not split over {state.num_processes} processes")
        stream = ShardedStream(lambda: open_source(config.data.source, config.data), state.process_index,
                               state.num_processes)
        return StreamBatches(stream, batch_size // state.num_processes, train.num_workers)
    images, captions = load_table(config, progress=progress)
    return TableBatches({"images": images, "captions": captions}, batch_size, seed)


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


# ----------------------------------------------------------------------------- dVAE


def train_dvae(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Trains the dVAE on the data's images and writes run_dir/dvae; returns its summary."""
    from dalle.dvae import DVAE, kl_weight_at, temperature_at

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
    if result.stopped_early:
        return {"stopped_early": True, "steps": result.steps}
    summary = evaluate_dvae(config, progress=progress)
    summary["train_seconds"] = round(result.seconds, 1)
    return summary


def evaluate_dvae(config: Config, n: int = 500, progress: bool = True) -> dict[str, float]:
    """PSNR, codebook use and (for shapes) reader agreement on the test split; writes a PNG."""
    from dalle.dvae import codebook_stats, decode, encode, load_dvae, psnr
    from dalle.viz import labelled_grid, save_png

    run_dir = Path(config.run_dir)
    model = load_dvae(run_dir / "dvae")
    images, captions = load_table(config, n=n, split="test", progress=progress)
    originals = to_float(images)
    codes, recons = [], []
    with torch.inference_mode():
        for start in range(0, len(originals), 100):
            batch_codes = encode(model, originals[start : start + 100])
            codes.append(batch_codes)
            recons.append(decode(model, batch_codes))
    codes, recons = torch.cat(codes), torch.cat(recons)
    summary = {"psnr": psnr(originals, recons), **codebook_stats(codes, config.dvae.codebook_size),
               "codebook_size": config.dvae.codebook_size, "grid": config.dvae.grid_size}
    recon_uint8 = (recons.clamp(0, 1) * 255).round().to(torch.uint8)
    failures: list[int] = []
    if config.data.source == "shapes":
        same = [shapes.reads_same(original.permute(1, 2, 0).numpy(), recon.permute(1, 2, 0).numpy(), caption)
                for original, recon, caption in zip(images, recon_uint8, captions)]
        summary["reader_agreement"] = sum(same) / len(images)
        failures = [i for i, ok in enumerate(same) if not ok]
    from PIL import Image

    def pil(t):
        return Image.fromarray(t.permute(1, 2, 0).numpy())

    show = list(range(min(16, len(images))))
    rows = [[pil(images[i]) for i in show], [pil(recon_uint8[i]) for i in show]]
    titles = ["originals", "reconstructions"]
    if failures:  # the pictures the reader reads differently, where to look first
        worst = failures[:16]
        rows += [[pil(images[i]) for i in worst], [pil(recon_uint8[i]) for i in worst]]
        titles += ["misread: originals", "misread: reconstructions"]
    save_png(labelled_grid(rows, row_titles=titles, cell=64), run_dir / "reports" / "dvae-reconstructions.png")
    (run_dir / "reports" / "dvae-metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- CLIP


def train_clip(config: Config, resume: str | None = "auto", progress: bool = True, stop_after: int | None = None):
    """Trains a CLIP on the data's (image, caption) pairs and writes run_dir/clip."""
    from dalle.clip import CLIP

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
    summary: dict[str, Any] = {"train_seconds": round(result.seconds, 1), "steps": result.steps}
    if not result.stopped_early and config.data.source == "shapes":
        summary.update(evaluate_clip_shapes(config))
    return summary


def evaluate_clip_shapes(config: Config, n: int = 500) -> dict[str, float]:
    """Zero-shot accuracy with the 24 colour-shape labels on one-object test pictures."""
    from dalle.clip import load_clip
    from dalle.rerank import CLIPScorer, classify, embed_images, search

    run_dir = Path(config.run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, config.tokenizer.text_len)
    scorer = CLIPScorer(load_clip(run_dir / "clip"), tokenizer)
    labels = shapes.all_captions_single()
    images, truths, held = [], [], []
    index = 0
    while len(images) < n:
        image, caption = shapes.render("test", config.data.seed + 1, index, config.data.size)
        index += 1
        scene = shapes.parse_caption(caption)
        if scene.relation is None:
            images.append(image)
            truths.append(labels.index(shapes.caption_of(shapes.Scene(objects=scene.objects))))
            held.append(scene.objects[0] in shapes.HELD_OUT)
    probs = classify(scorer, images, labels)
    right = (probs.argmax(1) == torch.tensor(truths)).numpy()
    held = np.array(held)
    # Search: each label as a query over the same pictures; the share of the top 5 that show it.
    embeddings = embed_images(scorer, images)
    truth = torch.tensor(truths)
    hits = [(truth[search(scorer, label, embeddings, 5)[0]] == index).float().mean().item()
            for index, label in enumerate(labels)]
    metrics = {"classify_accuracy": float(right.mean()),
               "classify_accuracy_held_out": float(right[held].mean()) if held.any() else float("nan"),
               "search_top5_precision": float(np.mean(hits)), "search_top5_precision_worst_label": float(min(hits))}
    metrics.update(evaluate_clip_twins(scorer, config, n // 2))
    return metrics


def evaluate_clip_twins(scorer, config: Config, n: int) -> dict[str, float]:
    """How often CLIP scores a test picture's caption above its false twin (`shapes.false_twin`).

    `twin_accuracy_order`: two-object pictures, against the objects swapped or the
    relation reversed; `twin_accuracy_binding`: against their colours or shapes swapped;
    `twin_accuracy_attribute`: one-object pictures, against another position or size;
    `twin_accuracy_shape`: any picture, against one object drawn as another shape.
    0.5 is a bag of words (for "shape": a CLIP blind to shape).
    """
    from dalle.rerank import embed_images

    rng = np.random.default_rng(config.data.seed)
    found: dict[str, list[tuple]] = {"order": [], "binding": [], "attribute": [], "shape": []}
    index = 0
    while min(len(v) for v in found.values()) < n and index < 50 * n:
        image, caption = shapes.render("test", config.data.seed + 2, index, config.data.size)
        index += 1
        for kind, items in found.items():
            twin = shapes.false_twin(caption, rng, kind)
            if twin is not None and len(items) < n:
                items.append((image, caption, twin))
    metrics = {}
    for kind, items in found.items():
        images = embed_images(scorer, [item[0] for item in items])  # (n, E)
        true = (images * scorer.embed_texts([item[1] for item in items])).sum(-1)  # (n,)
        false = (images * scorer.embed_texts([item[2] for item in items])).sum(-1)  # (n,)
        metrics[f"twin_accuracy_{kind}"] = float((true > false).float().mean())
    return metrics


# ----------------------------------------------------------------------------- transformer


def train_transformer(config: Config, resume: str | None = "auto", progress: bool = True,
                      stop_after: int | None = None):
    """Trains the transformer on (caption, frozen-dVAE codes) and writes run_dir/transformer."""
    from dalle.dvae import encode, load_dvae
    from dalle.transformer import DalleTransformer, drop_captions

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

    def draw_samples(record, model):  # a grid of what the model draws now, every sample_every steps
        if not train.sample_every or record["step"] % train.sample_every:
            return
        from dalle.dvae import decode
        from dalle.rerank import tensor_to_pil
        from dalle.sampling import sample_image_codes
        from dalle.viz import labelled_grid, save_png

        prompts = {"shapes": SAMPLE_PROMPTS, "digits": DIGIT_SAMPLE_PROMPTS}.get(config.data.source, [""] * 4)
        codes = sample_image_codes(model, tokenizer.encode(prompts), num_candidates=4, seed=0)
        grid = model_config.image_grid
        with torch.inference_mode():
            pixels = decode(dvae, codes.view(-1, grid, grid))
        rows = [[tensor_to_pil(p) for p in pixels[i * 4 : (i + 1) * 4]] for i in range(len(prompts))]
        path = run_dir / "samples" / f"step-{record['step']:08d}.png"
        save_png(labelled_grid(rows, row_titles=prompts, cell=48), path)

    from dalle.pipeline import write_sampling_defaults

    write_sampling_defaults(run_dir, config.sampling)  # how the pipeline samples unless told otherwise
    tokens = model_config.text_len + model_config.image_grid**2
    result = fit(model, batches, step_fn, train, run_dir, "transformer", resume=resume,
                 items_per_batch=lambda b: len(b["codes"]) * tokens, on_log=draw_samples, progress=progress,
                 stop_after=stop_after)
    return {"train_seconds": round(result.seconds, 1), "steps": result.steps, "last_loss": result.last_loss}
