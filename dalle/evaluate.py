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
from dalle.config import to_dict
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


class DigitReader(torch.nn.Module):
    """A small MLP that reads a handwritten digit (trained on the digits train split)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 256), torch.nn.ReLU(),
                                       torch.nn.Linear(256, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) floats in [0, 1] -> (B, 10) logits, read from the grey level."""
        return self.net(images.mean(1))


def _digit_tensors(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dalle.config import DataConfig
    from dalle.data import DIGIT_WORDS, open_source
    from dalle.rerank import pil_to_tensor

    source = open_source("digits", DataConfig(source="digits", split=split, size=size))
    images = torch.stack([pil_to_tensor(image) for image, _ in source])
    labels = torch.tensor([DIGIT_WORDS.index(caption.split()[-1]) for _, caption in source])
    return images, labels


def train_digit_reader(size: int, steps: int = 300, seed: int = 0) -> tuple[DigitReader, float]:
    """Trains the digit reader on the 4,000 training digits; returns it and its test accuracy."""
    torch.manual_seed(seed)
    images, labels = _digit_tensors("train", size)
    reader = DigitReader(size)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(reader(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reader.eval()
    test_images, test_labels = _digit_tensors("test", size)
    with torch.no_grad():
        accuracy = (reader(test_images).argmax(1) == test_labels).float().mean().item()
    return reader, accuracy


def evaluate_digits(pipeline: Pipeline, out: Path, candidates: int, prompts_per_digit: int, seed: int,
                    progress: bool = True, **sampling) -> dict:
    """How often the digit reader reads the asked digit at top-1 and for a random candidate."""
    from dalle.data import DIGIT_WORDS
    from dalle.rerank import pil_to_tensor

    reader, reader_accuracy = train_digit_reader(pipeline.image_size)
    top, rand, rows, titles = [], [], [], []
    prompts = [(digit, f"a handwritten {word}") for digit, word in enumerate(DIGIT_WORDS)
               for _ in range(prompts_per_digit)]
    rerank = pipeline.scorer is not None
    for index, (digit, prompt) in enumerate(tqdm(prompts, desc="digits", disable=not progress, leave=False)):
        (samples,) = pipeline([prompt], candidates=candidates, keep=candidates, seed=seed + index,
                              rerank_with_clip=rerank, **sampling)
        random_pick = next(s for s in samples if s.candidate == 0)
        with torch.no_grad():
            read = reader(torch.stack([pil_to_tensor(samples[0].image), pil_to_tensor(random_pick.image)])).argmax(1)
        top.append(int(read[0]) == digit)
        rand.append(int(read[1]) == digit)
        if index % prompts_per_digit == 0:
            rows.append([s.image for s in samples[:8]])
            titles.append(prompt)
    save_png(labelled_grid(rows, row_titles=titles, cell=64), out / "digits.png")
    return {"top1_digit": _share(top), "random_digit": _share(rand), "prompts": len(prompts),
            "reader_test_accuracy": reader_accuracy}


def evaluate_pipeline(model: str | Path, out: str | Path, candidates: int = 16, prompts_per_set: int = 50,
                      seed: int = 0, progress: bool = True, data: str = "shapes", clip: str | None = None,
                      **sampling) -> dict:
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
    pipeline = load_pipeline(model, clip=clip)
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
