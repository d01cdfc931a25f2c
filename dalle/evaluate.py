"""`dalle eval`: how often a pipeline draws what the prompt asks, read by the project's picture reader.

Three prompt sets from the shapes grammar (../shared/SHAPES.md): one object (with size
and position words where the grammar has them), two objects (a relation), and held-out
colour-shape pairs. For each prompt the pipeline samples N candidates; the CLIP's top-1
and the first sampled candidate (a random one of the N) are both judged, so the
difference is what reranking adds. Writes metrics.json and report.html with grids of the
best and worst prompts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dalle import shapes
from dalle.pipeline import Pipeline, load_pipeline
from dalle.viz import labelled_grid, save_png


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
        top = samples[0]
        random_pick = next(s for s in samples if s.candidate == 0)
        cases.append({"prompt": prompt, "top": shapes.judge(top.image, prompt),
                      "random": shapes.judge(random_pick.image, prompt),
                      "any": any(shapes.judge(s.image, prompt)["colour_shape"] for s in samples),
                      "score": top.clip_score, "images": [s.image for s in samples[:8]]})
    metrics = {}
    for key in ("colour_shape", "size", "position", "relation", "all"):
        tops = [c["top"][key] for c in cases if key in c["top"]]
        if tops:
            metrics[f"top1_{key}"] = _share(tops)
            metrics[f"random_{key}"] = _share([c["random"][key] for c in cases if key in c["random"]])
    metrics["any_of_n_colour_shape"] = _share([c["any"] for c in cases])
    scores = [c["score"] for c in cases if c["score"] is not None]
    metrics["mean_clip_score"] = float(np.mean(scores)) if scores else None
    metrics["prompts"] = len(cases)
    return {"metrics": metrics, "cases": cases}


def dvae_psnr(pipeline: Pipeline, n: int = 200) -> float:
    """Reconstruction PSNR of the pipeline's dVAE on shapes test pictures."""
    from dalle.dvae import decode, encode, psnr
    from dalle.rerank import pil_to_tensor

    size = pipeline.image_size
    originals = torch.stack([pil_to_tensor(shapes.render("test", 0, i, size)[0]) for i in range(n)])
    with torch.inference_mode():
        return float(psnr(originals, decode(pipeline.dvae, encode(pipeline.dvae, originals))))


def _png_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _case_grid(cases: list[dict]):
    return labelled_grid([c["images"] for c in cases],
                         [[("right" if c["top"]["all"] else "wrong") if i == 0 else "" for i in range(len(c["images"]))]
                          for c in cases],
                         row_titles=[f"{c['prompt']}  (clip {c['score']:.1f})" if c["score"] is not None
                                     else c["prompt"] for c in cases], cell=64, label_lines=1)


def write_report(out: Path, metrics: dict, results: dict, extra_html: str = "") -> Path:
    """report.html: the metrics table and, per set, the best and worst prompts' candidates."""
    rows = []
    for name, values in metrics.items():
        if isinstance(values, dict):
            for key, value in values.items():
                shown = f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))
                rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(key)}</td><td>{shown}</td></tr>")
        else:
            rows.append(f"<tr><td>{html.escape(name)}</td><td></td><td>{html.escape(str(values))}</td></tr>")
    sections = []
    for name, result in results.items():
        cases = sorted(result["cases"], key=lambda c: (c["top"]["all"], c["score"] or 0.0), reverse=True)
        for title, chosen in (("best", cases[:6]), ("worst", cases[-6:][::-1])):
            grid = _case_grid(chosen)
            save_png(grid, out / f"{name}-{title}.png")
            sections.append(f"<h3>{html.escape(name)}: {title}</h3><img src='{name}-{title}.png' "
                            f"alt='{name} {title}'>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dalle eval</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 8px}}img{{image-rendering:pixelated;max-width:100%}}</style></head>
<body><h1>dalle evaluation</h1>{extra_html}<h2>Metrics</h2><table>{''.join(rows)}</table>
<p>top1: the CLIP's favourite of the N candidates; random: the first sampled candidate.
Read by the project's reader of pictures (palette + connected components).</p>
{''.join(sections)}</body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def evaluate_pipeline(model: str | Path, out: str | Path, candidates: int = 16, prompts_per_set: int = 50,
                      seed: int = 0, progress: bool = True, **sampling) -> dict:
    """Runs every prompt set on a pipeline directory; writes out/metrics.json and out/report.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(model)
    results = {name: evaluate_prompts(pipeline, prompts, candidates, seed, progress, desc=name, **sampling)
               for name, prompts in prompt_sets(prompts_per_set, seed).items()}
    metrics: dict = {name: r["metrics"] for name, r in results.items()}
    metrics["dvae_psnr"] = dvae_psnr(pipeline)
    metrics["candidates"] = candidates
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_report(out, metrics, results)
    return metrics
