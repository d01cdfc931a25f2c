"""`dalle demo`: every stage trained on the built-in shapes data, then pictures for prompts.

Stages already trained in the output directory are reused (`--fresh` retrains them), so a
second run goes straight to sampling. Writes OUT/grid.png (a row per prompt, candidates
best first, prompt and CLIP score on the picture), OUT/report.html (the grid, the
metrics and the training curves) and the loadable pipeline OUT/model/.
"""

from __future__ import annotations

import html
import json
import logging
import shutil
import time
from pathlib import Path

from dalle.checkpoint import lock_directory
from dalle.config import load_config
from dalle.errors import DalleError
from dalle.evaluation.evaluate import evaluate_prompts, prompt_sets
from dalle.evaluation.report import write_report
from dalle.evaluation.stages import evaluate_clip_shapes, evaluate_dvae
from dalle.inference.pipeline import load_pipeline
from dalle.training import stages
from dalle.viz import labelled_grid, line_chart, save_png

log = logging.getLogger(__name__)

DEMO_PROMPTS = [
    "a red circle",
    "a small blue square in the top left",
    "a large yellow triangle",
    "a green circle in the bottom right",
    "a white square in the center",
    "a red circle above a blue square",
    "a green triangle to the left of a white circle",
    "a purple triangle",
    "an orange circle",
    "a cyan square",
]


def _log_series(run_dir: Path, stage: str, key: str = "loss") -> list[tuple[float, float]]:
    path = run_dir / "logs" / f"{stage}.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r[key]) for r in records if key in r]


def run_demo(out: str | Path = "runs/demo", config_path: str | Path = "configs/demo.yaml", fresh: bool = False,
             overrides: list[str] | None = None, candidates: int = 8, eval_prompts: int = 10,
             progress: bool = True, device: str = "auto", dtype: str = "auto") -> Path:
    """Trains (or reuses) every stage, samples DEMO_PROMPTS, writes grid.png and report.html."""
    with lock_directory(out):
        return _run_demo(Path(out), config_path, fresh, overrides, candidates, eval_prompts, progress, device, dtype)


def _run_demo(out: Path, config_path: str | Path, fresh: bool, overrides: list[str] | None, candidates: int,
              eval_prompts: int, progress: bool, device: str, dtype: str) -> Path:
    model_dir = out / "model"
    config = load_config(config_path, [*(overrides or []), f"run_dir={model_dir}"])
    if config.data.source != "shapes":
        raise DalleError("the demo trains on the built-in shapes data (data.source: shapes)")
    if fresh and model_dir.exists():
        shutil.rmtree(model_dir)
    trained = stages.train_all(config, progress=progress, retrain_tokenizer=True)  # what is there is kept
    timings: dict[str, float] = {stage: summary["seconds"] for stage, summary in trained.items()}
    if "dvae" in trained:  # train, then measure: the report shows the dVAE's figures
        evaluate_dvae(config, progress=progress)

    started = time.perf_counter()
    pipeline = load_pipeline(model_dir, device=device, dtype=dtype)
    results = pipeline(DEMO_PROMPTS, candidates=candidates, keep=candidates, seed=0)
    grid = labelled_grid([[s.image for s in samples] for samples in results],
                         [[f"#{s.rank} {s.clip_score:.1f}" for s in samples] for samples in results],
                         row_titles=DEMO_PROMPTS, cell=64, label_lines=1)
    grid_path = save_png(grid, out / "grid.png")
    timings["sampling"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    sets = prompt_sets(eval_prompts, seed=0)
    evaluated = {name: evaluate_prompts(pipeline, prompts, candidates, 0, progress, desc=name)
                 for name, prompts in sets.items()}
    metrics = {name: r["metrics"] for name, r in evaluated.items()}
    timings["evaluation"] = round(time.perf_counter() - started, 1)
    metrics["stage_seconds"] = timings
    dvae_metrics = model_dir / "reports" / "dvae-metrics.json"
    if dvae_metrics.is_file():
        metrics["dvae"] = json.loads(dvae_metrics.read_text())
    metrics["clip"] = evaluate_clip_shapes(config, n=200)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    charts = []
    for name in ("dvae", "clip", "transformer"):
        chart = line_chart({"loss": _log_series(model_dir, name)}, f"{name} training loss")
        charts.append(save_png(chart, out / f"curve-{name}.png").name)
    extra = ("<h2>Samples</h2><p>A row per prompt, candidates best first (CLIP score under each).</p>"
             "<img src='grid.png' alt='samples'><h2>Training curves</h2>"
             + "".join(f"<img src='{html.escape(c)}' alt='{html.escape(c)}'>" for c in charts))
    write_report(out, metrics, evaluated, extra_html=extra)
    log.info("[demo] stage seconds: %s", json.dumps(timings))
    log.info("[demo] one object, colour+shape right at top-1 of %d: %.0f%% (random pick: %.0f%%)", candidates,
             100 * metrics["one_object"].get("top1_colour_shape", float("nan")),
             100 * metrics["one_object"].get("random_colour_shape", float("nan")))
    log.info("[demo] report: %s", out / "report.html")
    return grid_path
