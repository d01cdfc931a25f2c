"""Scratch trainer for the CLIP stage (a plain AdamW loop) and its shapes evaluation.

Temporary: `dalle train-clip` (dalle/train.py, on accelerate) replaces the loop, and the
evaluation moves to dalle/evaluate.py. Kept small so both are easy to lift.

    PYTHONPATH=$PWD .venv/bin/python scripts/train_clip_scratch.py --config configs/clip-shapes.yaml
    PYTHONPATH=$PWD .venv/bin/python scripts/train_clip_scratch.py --config configs/clip-shapes.yaml --eval-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from dalle import shapes
from dalle.checkpoint import write_json_atomic
from dalle.clip import CLIP, load_clip, save_clip
from dalle.config import Config, DataConfig, load_config
from dalle.data import open_source
from dalle.rerank import CLIPScorer, Scorer, classify, embed_images, pil_to_tensor, search
from dalle.tokenizer import load_tokenizer


def learning_rate(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to base * min_ratio."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: Config, threads: int) -> CLIP:
    """Trains a CLIP on `config.data` for `config.train.clip.steps` steps and saves it."""
    settings = config.train.clip
    tokenizer = load_tokenizer(config.tokenizer.path, config.tokenizer.text_len)
    clip_config = dataclasses.replace(config.clip, text_len=tokenizer.text_len, text_vocab=tokenizer.total_vocab,
                                      image_size=config.data.size)
    torch.manual_seed(settings.seed)
    model = CLIP(clip_config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms, biases, the temperature
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                  betas=tuple(settings.betas))
    pairs = iter(open_source(None, config.data))
    print(f"CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{settings.steps} steps of {settings.batch_size}, {threads} thread(s)", flush=True)
    start, seen = time.time(), 0.0
    for step in range(settings.steps):
        batch = [next(pairs) for _ in range(settings.batch_size)]
        images = torch.stack([pil_to_tensor(image) for image, _ in batch])  # (B, 3, S, S)
        text_ids = tokenizer.encode([caption for _, caption in batch])  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.lr, settings.warmup_steps, settings.steps,
                                        settings.min_lr_ratio)
        loss = model(text_ids, images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        seen = 0.9 * seen + 0.1 * loss.item() if step else loss.item()
        if step % settings.log_every == 0 or step == settings.steps - 1:
            print(f"step {step:5d}  loss {seen:.3f}  scale {model.logit_scale.item():6.2f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {time.time() - start:6.0f}s", flush=True)
    minutes = (time.time() - start) / 60
    save_clip(model, Path(config.run_dir) / "clip",
              extra={"tokenizer": config.tokenizer.path, "steps": settings.steps, "train_minutes": round(minutes, 2)})
    print(f"trained in {minutes:.1f} min; saved {Path(config.run_dir) / 'clip'}", flush=True)
    return model


def single_object_pictures(data: DataConfig, n: int, pairs=None) -> tuple[list, list[tuple[str, str]]]:
    """The first n single-object test pictures (of `pairs` only, if given) and their pairs."""
    images, truths, index = [], [], 0
    while len(images) < n:
        scene = shapes.sample_scene("test", data.seed, index)
        if len(scene.objects) == 1 and (pairs is None or scene.objects[0] in pairs):
            images.append(shapes.render("test", data.seed, index, data.size)[0])
            truths.append(scene.objects[0])
        index += 1
    return images, truths


def evaluate(scorer: Scorer, data: DataConfig, n: int = 500, n_held_out: int = 200) -> dict[str, float]:
    """Zero-shot classification and search on the shapes test split, with the 24 colour-shape labels."""
    labels = shapes.all_captions_single()  # "a red circle", ... in shapes.ALL_PAIRS order
    metrics: dict[str, float] = {}
    for name, pairs, count in (("all", None, n), ("held_out", shapes.HELD_OUT, n_held_out)):
        images, truths = single_object_pictures(data, count, pairs)
        guesses = classify(scorer, images, labels, batch_size=100).argmax(-1)
        right = [shapes.ALL_PAIRS[g] == truth for g, truth in zip(guesses.tolist(), truths)]
        metrics[f"classify_{name}"] = sum(right) / len(right)
    # Search over the first n test pictures (one or two objects): is the hit's scene holding the pair?
    scenes = [shapes.sample_scene("test", data.seed, i) for i in range(n)]
    index = embed_images(scorer, [shapes.render("test", data.seed, i, data.size)[0] for i in range(n)], 100)
    precision = []
    for label, pair in zip(labels, shapes.ALL_PAIRS):
        hits, _ = search(scorer, label, index, k=5)
        precision.append(sum(pair in scenes[h].objects for h in hits.tolist()) / len(hits))
    metrics["search_top5_mean"] = sum(precision) / len(precision)
    metrics["search_top5_min"] = min(precision)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core box)")
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    tokenizer = load_tokenizer(config.tokenizer.path, config.tokenizer.text_len)
    model = load_clip(Path(config.run_dir) / "clip") if args.eval_only else train(config, args.threads)
    start = time.time()
    eval_data = dataclasses.replace(config.data, split="test")
    metrics = evaluate(CLIPScorer(model, tokenizer), eval_data)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    write_json_atomic(Path(config.run_dir) / "clip_eval.json", metrics)
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
