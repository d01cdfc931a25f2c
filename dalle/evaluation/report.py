"""report.html: a metrics table, then grids of the best and worst prompts of each set."""

from __future__ import annotations

import html
from pathlib import Path

from dalle.viz import labelled_grid, save_png


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


