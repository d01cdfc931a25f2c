"""Scratch dVAE trainer for tuning configs/dvae-shapes.yaml (to be replaced by dalle/train.py).

A deliberately trivial loop: AdamW, linear warm-up then cosine decay, the dVAE's own
temperature and KL schedules, optional bf16 autocast. Everything model-specific lives in
dalle/dvae.py. At the end it evaluates on the shapes test split: PSNR, codebook use, and
whether the picture reader reads each reconstruction the same as its original.

    PYTHONPATH=$PWD python scripts/train_dvae_scratch.py --config configs/dvae-shapes.yaml --out runs/x
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle import shapes
from dalle.config import load_config
from dalle.dvae import DVAE, codebook_stats, decode, encode, kl_weight_at, psnr, save_dvae, temperature_at


def shapes_tensor(split: str, seed: int, n: int, size: int, cache: Path | None) -> torch.Tensor:
    """n shapes pictures as uint8 (n, 3, size, size), cached as .npy (rendering is ~0.7 ms each)."""
    path = cache / f"shapes-{split}-{seed}-{n}-{size}.npy" if cache else None
    if path and path.is_file():
        return torch.from_numpy(np.load(path))
    array = np.stack([np.asarray(shapes.render(split, seed, i, size)[0]) for i in range(n)]).transpose(0, 3, 1, 2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array)
    return torch.from_numpy(np.ascontiguousarray(array))


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def reads_same(original: Image.Image, reconstruction: Image.Image, caption: str) -> bool:
    """The reader finds the same objects (colour, shape, size word) and judges the caption alike."""
    def read(image):
        canvas = image.size[0]
        return sorted((o.colour, o.shape, shapes._size_word(o.side, canvas) or "-") for o in shapes.read_objects(image))
    return read(original) == read(reconstruction) and shapes.judge(original, caption) == shapes.judge(
        reconstruction, caption)


@torch.no_grad()
def evaluate(model: DVAE, config, n: int, out: Path | None) -> dict:
    model.eval()
    size, seed = config.data.size, config.data.seed
    pairs = [shapes.render("test", seed, i, size) for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in pairs]).float() / 255
    codes = torch.cat([encode(model, images[i : i + 100]) for i in range(0, n, 100)])
    recon = torch.cat([decode(model, codes[i : i + 100]) for i in range(0, n, 100)])
    # The reader sees what a PNG would hold: 8-bit pixels.
    recon8 = (recon * 255).round() / 255
    same = [reads_same(im, to_pil(r), cap) for (im, cap), r in zip(pairs, recon8)]
    per_image = -10 * torch.log10(((recon8 - images) ** 2).flatten(1).mean(1).clamp_min(1e-10))
    metrics = {
        "psnr": psnr(recon8, images),
        "psnr_mean_per_image": per_image.mean().item(),
        **codebook_stats(codes, model.config.codebook_size),
        "reader_agreement": sum(same) / n,
        "n": n,
    }
    if out is not None:
        failures = [i for i, ok in enumerate(same) if not ok][:16]
        show = list(range(16)) + failures
        top = np.concatenate([np.asarray(pairs[i][0]) for i in show], 1)
        bottom = np.concatenate([np.asarray(to_pil(recon8[i])) for i in show], 1)
        grid = Image.fromarray(np.concatenate([top, bottom], 0))
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out / "reconstructions.png")
        (out / "failures.txt").write_text("\n".join(f"{i}\t{pairs[i][1]}" for i in failures) + "\n")
    model.train()
    return metrics


def fit_to_seconds(config, seconds: float, device: str):
    """The config with its step counts scaled so that training takes about `seconds` here."""
    c, t = config.dvae, config.train.dvae
    model = DVAE(c).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(t.batch_size, c.channels, c.image_size, c.image_size, device=device)
    for step in range(13):
        if step == 3:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.time()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16"):
            loss = model(images, 1.0, 1.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_step = (time.time() - started) / 10
    steps = max(50, int(seconds / per_step))
    scale = steps / t.steps
    print(f"fit: {per_step:.3f} s/step -> {steps} steps (x{scale:.2f})", flush=True)
    t.steps, t.warmup_steps = steps, max(1, round(t.warmup_steps * scale))
    c.temperature_steps = round(c.temperature_steps * scale)
    c.kl_warmup_steps = round(c.kl_warmup_steps * scale)
    return config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--cache", default="/tmp/dvae-cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fit-seconds", type=float, default=0.0,
                        help="time 10 steps first, then scale train.steps and every schedule length so that "
                             "training takes about this long (for tuning, not for shipped configs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, args.set)
    if args.fit_seconds:
        config = fit_to_seconds(config, args.fit_seconds, args.device)
    c, t = config.dvae, config.train.dvae
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    started = time.time()
    data = shapes_tensor("train", config.data.seed, args.train_images, config.data.size, Path(args.cache))
    data = data.to(args.device)
    model = DVAE(c).to(args.device)
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, grid {c.grid_size}, data "
          f"{time.time() - started:.1f}s", flush=True)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    generator = torch.Generator().manual_seed(t.seed)
    log = []
    for step in range(t.steps):
        batch = data[torch.randint(0, len(data), (t.batch_size,), generator=generator).to(args.device)]
        images = batch.float() / 255  # (B, 3, H, W)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t.steps, t.lr, t.warmup_steps, t.min_lr_ratio)
        temperature, kl_weight = temperature_at(c, step), kl_weight_at(c, step)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16"):
            result = model(images, temperature=temperature, kl_weight=kl_weight)
        optimizer.zero_grad(set_to_none=True)
        result["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if step % t.log_every == 0 or step == t.steps - 1:
            row = {"step": step, "time": round(time.time() - started, 1), "loss": round(result["loss"].item(), 4),
                   "recon": round(result["recon_loss"].item(), 4), "kl": round(result["kl"].item(), 3),
                   "tau": round(temperature, 3), "beta": round(kl_weight, 2),
                   "psnr_relaxed": round(psnr(result["reconstruction"], images), 2)}
            log.append(row)
            print(json.dumps(row), flush=True)
    train_seconds = time.time() - started
    model = model.cpu()
    save_dvae(model, out / "dvae")
    metrics = evaluate(model, config, args.eval_n, out)
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["total_seconds"] = round(time.time() - started, 1)
    metrics["steps"] = t.steps
    metrics["config"] = {"dvae": dataclasses.asdict(c), "train": dataclasses.asdict(t)}
    print(json.dumps(metrics), flush=True)
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "log": log}, indent=1))


if __name__ == "__main__":
    main()
