"""`dalle eval`: how often a pipeline draws what the prompt asks, read by the project's picture reader.

Three prompt sets from the shapes grammar (../shared/SHAPES.md): one object (with size
and position words where the grammar has them), two objects (a relation), and held-out
colour-shape pairs. For each prompt the pipeline samples N candidates; the CLIP's top-1
and the first sampled candidate (a random one of the N) are both judged, so the
difference is what reranking adds. Writes metrics.json and report.html with grids of the
best and worst prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle.config_io import to_dict
from dalle.data import shapes
from dalle.evaluation.digits import evaluate_digits
from dalle.evaluation.report import write_report
from dalle.images import pil_to_tensor
from dalle.inference.pipeline import Pipeline, load_pipeline
from dalle.models.dvae import psnr


def prompt_sets(count: int, seed: int = 0) -> dict[str, list[str]]:
    """`count` prompts each: one_object, two_objects, held_out (deterministic for a seed)."""
    sets: dict[str, list[str]] = {"one_object": [], "two_objects": [], "held_out": []}
    index = 0
    while min(len(v) for v in sets.values()) < count and index < 1_000_000:
        scene = shapes.sample_scene("test", 10_000 + seed, index)
        index += 1
        if scene.relation is not None:
            name = "two_objects" if not set(scene.objects) & shapes.HELD_OUT else None
        else:
            name = "held_out" if scene.objects[0] in shapes.HELD_OUT else "one_object"
        if name and len(sets[name]) < count:
            sets[name].append(shapes.caption_of(scene))
    return sets


def _share(values: list[bool]) -> float:
    return float(np.mean(values)) if values else float("nan")


def evaluate_prompts(pipeline: Pipeline, prompts: list[str], candidates: int, seed: int,
                     progress: bool = True, desc: str = "eval", **sampling) -> dict:
    """Judges top-1 (CLIP) and a random candidate for each prompt; returns metrics and cases."""
    cases = []
    rerank = pipeline.scorer is not None
    for index, prompt in enumerate(tqdm(prompts, desc=desc, disable=not progress, leave=False)):
        (samples,) = pipeline([prompt], candidates=candidates, keep=candidates, seed=seed + index,
                              rerank_with_clip=rerank, **sampling)
        verdicts = [shapes.judge(s.image, prompt) for s in samples]  # best first
        random_pick = next(i for i, s in enumerate(samples) if s.candidate == 0)
        cases.append({"prompt": prompt, "top": verdicts[0], "random": verdicts[random_pick],
                      "any": any(v["colour_shape"] for v in verdicts), "any_all": any(v["all"] for v in verdicts),
                      "share": np.mean([v["colour_shape"] for v in verdicts]),
                      "share_all": np.mean([v["all"] for v in verdicts]),
                      "score": samples[0].clip_score, "images": [s.image for s in samples[:8]]})
    metrics = {}
    for key in ("colour_shape", "size", "position", "relation", "all"):
        tops = [c["top"][key] for c in cases if key in c["top"]]
        if tops:
            metrics[f"top1_{key}"] = _share(tops)
            metrics[f"random_{key}"] = _share([c["random"][key] for c in cases if key in c["random"]])
    # The generator alone (every candidate, less noisy than the one random pick) and what a
    # perfect reranker could reach (any of the N right).
    metrics["candidates_colour_shape"] = _share([c["share"] for c in cases])
    metrics["candidates_all"] = _share([c["share_all"] for c in cases])
    metrics["any_of_n_colour_shape"] = _share([c["any"] for c in cases])
    metrics["any_of_n_all"] = _share([c["any_all"] for c in cases])
    scores = [c["score"] for c in cases if c["score"] is not None]
    metrics["mean_clip_score"] = float(np.mean(scores)) if scores else None
    metrics["prompts"] = len(cases)
    return {"metrics": metrics, "cases": cases}


def dvae_psnr(pipeline: Pipeline, n: int = 200) -> float:
    """Reconstruction PSNR of the pipeline's image tokenizer (dVAE or VQGAN) on shapes test pictures."""
    size = pipeline.image_size
    originals = torch.stack([pil_to_tensor(shapes.render("test", 0, i, size)[0]) for i in range(n)])
    with torch.inference_mode():
        tokenizer = pipeline.image_tokenizer
        return float(psnr(originals, tokenizer.decode(tokenizer.encode(originals))))


def evaluate_pipeline(model: str | Path, out: str | Path, candidates: int = 16, prompts_per_set: int = 50,
                      seed: int = 0, progress: bool = True, data: str = "shapes", clip: str | None = None,
                      device: str = "auto", dtype: str = "auto", **sampling) -> dict:
    """Runs every prompt set on a pipeline directory; writes out/metrics.json and out/report.html.

    Args:
        model: the pipeline directory.
        out: where metrics.json, report.html and the grids go.
        candidates: pictures sampled per prompt (N).
        prompts_per_set: prompts in each shapes set (digits: per digit, a tenth of it, at least 1).
        seed: sampling seed of the first prompt.
        progress: show progress bars.
        data: "shapes" or "digits": what the model was trained on.
        clip: another CLIP to rerank with (`hf:NAME_OR_DIR` or a CLIP model directory).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(model, clip=clip, device=device, dtype=dtype)
    settings = {**to_dict(pipeline.sampling), **sampling}  # what was used: the model's defaults, then overrides
    if data == "digits":
        metrics = {"digits": evaluate_digits(pipeline, out, candidates, max(1, prompts_per_set // 10), seed,
                                             progress, **sampling), "candidates": candidates,
                   "sampling": settings}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        write_report(out, metrics, {}, extra_html="<h2>Samples</h2><img src='digits.png' alt='digits'>")
        return metrics
    results = {name: evaluate_prompts(pipeline, prompts, candidates, seed, progress, desc=name, **sampling)
               for name, prompts in prompt_sets(prompts_per_set, seed).items()}
    metrics: dict = {name: r["metrics"] for name, r in results.items()}
    metrics["dvae_psnr"] = dvae_psnr(pipeline)
    metrics["candidates"] = candidates
    metrics["sampling"] = settings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_report(out, metrics, results)
    return metrics
