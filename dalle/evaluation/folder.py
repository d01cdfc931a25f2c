"""`dalle eval --data folder:DIR`: generation measured against the real pictures of a folder.

For each caption of the folder (or a seeded sample of N) the pipeline samples N candidates
and CLIP ranks them; the top-1 is judged by
- retrieval: is the real picture of that caption the nearest, among every real picture of
  the folder and of the training folder, to the generated one? The feature space is the
  pictures themselves at 16 x 16 (area-averaged RGB, L2 distance): colour and layout, which
  is what a blurred or wrong picture gets wrong. Its calibration is reported beside it: the
  real pictures shifted by one pixel, with noise, through the tokenizer (its ceiling), and a
  random caption's picture (chance);
- the CLIP score with the pipeline's CLIP (and with `--clip hf:NAME` when given);
- the Fréchet distance between the CLIP image features of the generated and the real pictures.
Held-out kinds listed in a `split.json` beside the folder are reported separately.
Writes E/metrics.json and E/report.html (caption | real picture | ranked candidates, worst first).
"""

from __future__ import annotations

import html
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dalle.config import DataConfig
from dalle.data.sources import FolderSource
from dalle.errors import DalleError
from dalle.images import pil_to_tensor, tensor_to_pil
from dalle.inference.pipeline import Pipeline
from dalle.inference.scorers import load_scorer
from dalle.inference.scoring import Scorer, embed_images, score_images
from dalle.models.dvae import psnr
from dalle.viz import labelled_grid, save_png

FEATURE_SIDE = 16


def read_folder(directory: Path, size: int) -> tuple[list[str], torch.Tensor, list[str], str]:
    """(stems, (N, 3, S, S) floats, captions, what was skipped) of a folder of pairs; odd pictures
    (grey, RGBA, 16-bit, palette) are converted, unreadable or huge ones skipped and counted."""
    source = FolderSource(DataConfig(source=f"folder:{directory}", size=size), str(directory))
    stems, images, captions = [], [], []
    for path in source.records():
        pair = source.convert(path)
        if pair is not None:
            stems.append(path.stem)
            images.append(pil_to_tensor(pair[0]))
            captions.append(pair[1])
    if not images:
        raise DalleError(f"no usable pairs in {directory}")
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(source.skipped.items()))
    return stems, torch.stack(images), captions, f"{len(stems)} read, {sum(source.skipped.values())} skipped" + (
        f" ({reasons})" if reasons else "")


def features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (B, 3 * 16 * 16): the pictures, area-averaged to 16 x 16."""
    return F.adaptive_avg_pool2d(images.float(), FEATURE_SIDE).flatten(1)


def retrieval_ranks(queries: torch.Tensor, gallery: torch.Tensor, targets: list[set[int]]) -> list[int]:
    """1-based rank of the first target among the gallery, by distance to each query's features."""
    ranks = []
    for start in range(0, len(queries), 256):
        distances = torch.cdist(features(queries[start:start + 256]), gallery)  # (q, G)
        order = distances.argsort(dim=1)
        for row, wanted in zip(order.tolist(), targets[start:start + 256]):
            ranks.append(next(i for i, index in enumerate(row) if index in wanted) + 1)
    return ranks


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features (rows)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)


def _share(ranks: list[int], k: int) -> float:
    return float(np.mean([r <= k for r in ranks])) if ranks else float("nan")


def calibration(pipeline: Pipeline, images: torch.Tensor, gallery: torch.Tensor, targets: list[set[int]],
                seed: int) -> dict[str, float]:
    """Retrieval top-1 / top-5 of the real pictures under small changes, of their reconstructions, and chance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        batches = [images[i:i + 64].to(pipeline.device) for i in range(0, len(images), 64)]
        tokenizer = pipeline.image_tokenizer
        recons = torch.cat([tokenizer.decode(tokenizer.encode(batch)).cpu() for batch in batches]).float()
    changed = {"shifted_1px": torch.roll(images, shifts=(1, 1), dims=(2, 3)),
               "noise_0.05": (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1),
               "reconstruction": recons,
               "random_caption": images[torch.randperm(len(images), generator=generator)]}
    out = {"reconstruction_psnr": psnr(images, recons)}
    for name, queries in changed.items():
        ranks = retrieval_ranks(queries, gallery, targets)
        out[f"real_{name}_top1"], out[f"real_{name}_top5"] = _share(ranks, 1), _share(ranks, 5)
    return out


def evaluate_folder(pipeline: Pipeline, test_dir: str | Path, out: str | Path, candidates: int = 16,
                    n: int | None = None, seed: int = 0, train_dir: str | Path | None = None,
                    hf_clip: str | None = None, progress: bool = True, **sampling) -> dict:
    """Writes out/metrics.json and out/report.html for the captions of a folder of real pictures."""
    if pipeline.scorer is None:
        raise DalleError("evaluating on real pictures needs a CLIP: the pipeline has none (pass --clip)")
    test_dir, out = Path(test_dir), Path(out)
    size = pipeline.image_size
    stems, images, captions, skipped = read_folder(test_dir, size)
    split = test_dir.parent / "split.json"
    train_dir = Path(train_dir) if train_dir else (test_dir.parent / "train" if split.is_file() else None)
    gallery_images, gallery_captions = images, list(captions)
    if train_dir is not None and train_dir.resolve() != test_dir.resolve():
        _, train_images, train_captions, _ = read_folder(train_dir, size)
        gallery_images = torch.cat([images, train_images])
        gallery_captions += train_captions
    gallery = features(gallery_images)
    by_caption: dict[str, set[int]] = {}
    for index, caption in enumerate(gallery_captions):
        by_caption.setdefault(caption, set()).add(index)
    chosen = list(range(len(stems)))
    if n is not None and n < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, n))
    kinds = _kinds(split, stems)
    cases = _generate(pipeline, [captions[i] for i in chosen], candidates, seed, progress, sampling)
    top = torch.stack([pil_to_tensor(case["samples"][0].image) for case in cases])
    ranks = retrieval_ranks(top, gallery, [by_caption[captions[i]] for i in chosen])
    hf_scores = None
    if hf_clip:
        scorer = load_scorer(hf_clip, device=pipeline.device)
        hf_scores = [float(score_images(scorer, captions[i], top[j:j + 1])[0]) for j, i in enumerate(chosen)]
    for j, (case, index) in enumerate(zip(cases, chosen)):
        case.update(rank=ranks[j], stem=stems[index], kind=kinds.get(stems[index], "other") if kinds else "all",
                    real=images[index], hf_score=None if hf_scores is None else hf_scores[j])
    metrics = {"data": str(test_dir), "gallery": len(gallery_captions), "captions": len(cases),
               "candidates": candidates, "skipped": skipped,
               "feature_space": f"RGB at {FEATURE_SIDE}x{FEATURE_SIDE}, L2"}
    for kind in sorted({c["kind"] for c in cases} - {"all"}) + ["all"]:
        subset = [c for c in cases if kind == "all" or c["kind"] == kind]
        metrics[kind] = _summary(pipeline.scorer, subset)
    targets = [by_caption[captions[i]] for i in chosen]
    metrics["calibration"] = calibration(pipeline, images[chosen], gallery, targets, seed)
    metrics["sampling"] = {k: v for k, v in sampling.items() if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    _report(out, metrics, cases)
    return metrics


def _kinds(split: Path, stems: list[str]) -> dict[str, str]:
    """stem -> held-out kind, from a split.json beside the folder (`held_out: {kind: [stems]}`)."""
    if not split.is_file():
        return {}
    try:
        held = json.loads(split.read_text(encoding="utf-8")).get("held_out", {})
        return {stem: kind for kind, listed in held.items() for stem in listed}
    except (OSError, ValueError, AttributeError):
        return {}


def _generate(pipeline: Pipeline, captions: list[str], candidates: int, seed: int, progress: bool,
              sampling: dict) -> list[dict]:
    cases = []
    for index, caption in enumerate(tqdm(captions, desc="captions", disable=not progress, leave=False)):
        (samples,) = pipeline([caption], candidates=candidates, keep=candidates, seed=seed + index, **sampling)
        cases.append({"caption": caption, "samples": samples})
    return cases


def _summary(scorer: Scorer, cases: list[dict]) -> dict[str, float]:
    ranks = [c["rank"] for c in cases]
    generated = embed_images(scorer, [c["samples"][0].image for c in cases])
    real = embed_images(scorer, torch.stack([c["real"] for c in cases]))
    summary = {"n": len(cases), "retrieval_top1": _share(ranks, 1), "retrieval_top5": _share(ranks, 5),
               "median_rank": float(np.median(ranks)),
               "clip_score": float(np.mean([c["samples"][0].clip_score for c in cases])),
               "clip_score_real": float(np.mean([scorer.logit_scale * float(r @ t) for r, t in
                                                 zip(real, scorer.embed_texts([c["caption"] for c in cases]))])),
               "frechet_clip": frechet_distance(generated, real) if len(cases) > 1 else float("nan")}
    if cases and cases[0]["hf_score"] is not None:
        summary["hf_clip_score"] = float(np.mean([c["hf_score"] for c in cases]))
    return summary


def _report(out: Path, metrics: dict, cases: list[dict]) -> None:
    worst = sorted(cases, key=lambda c: -c["rank"])[:40]
    rows = [[tensor_to_pil(c["real"]), *[s.image for s in c["samples"][:8]]] for c in worst]
    labels = [["real", *[f"#{s.rank} {s.clip_score:.1f}" for s in c["samples"][:8]]] for c in worst]
    titles = [f"{c['caption']}  (rank of the real picture: {c['rank']}; {c['kind']})" for c in worst]
    if rows:
        save_png(labelled_grid(rows, labels, row_titles=titles, cell=64, label_lines=1), out / "worst.png")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td><pre>{html.escape(json.dumps(v, indent=1))}</pre></td></tr>"
                    for k, v in metrics.items())
    (out / "report.html").write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>dalle eval</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{border:1px solid #ccc;padding:2px 8px;vertical-align:top}}
table{{border-collapse:collapse}}img{{image-rendering:pixelated;max-width:100%}}pre{{margin:0}}</style></head>
<body><h1>dalle evaluation on real pictures</h1><table>{table}</table>
<h2>Caption | real picture | ranked candidates, worst first</h2>
<img src="worst.png" alt="worst first"></body></html>""",
                                     encoding="utf-8")

