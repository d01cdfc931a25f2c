"""The output folder of `dalle generate`, `edit` and `imagine` (../shared/CONTRACT.md).

OUT/PPPP-RRR.png per kept picture (prompt P, rank R), OUT/samples.jsonl (one line per kept
picture: prompt, image, rank, clip_score, seed, and more keys where a command has them),
OUT/grid.png, and with frames, OUT/PPPP-RRR.gif: the picture forming. Every file goes
through a temporary name and a rename; samples.jsonl is written last, so it never names a
picture that is not there.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dalle.checkpoint import write_text_atomic
from dalle.viz import labelled_grid, save_png


@dataclass
class Results:
    """What a command collects, prompt by prompt, before `write` puts it in the folder."""

    out: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[Image.Image]] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)

    def add(self, index: int, prompt: str, seed: int, samples: list, frames: list[list[Image.Image]] | None = None,
            **extra: Any) -> None:
        """Writes one prompt's kept pictures (and their frames: per candidate, in sampling order)."""
        for sample in samples:
            name = f"{index:04d}-{sample.rank:03d}.png"
            save_png(sample.image, self.out / name)
            line = {"prompt": prompt, "image": name, "rank": sample.rank, "clip_score": sample.clip_score,
                    "seed": seed, **extra}
            if frames is not None:
                line["frames"] = save_animation([step[sample.candidate] for step in frames] + [sample.image],
                                                self.out / f"{index:04d}-{sample.rank:03d}.gif").name
            self.lines.append(line)
        self.rows.append([s.image for s in samples])
        self.labels.append([f"#{s.rank}" + (f" {s.clip_score:.1f}" if s.clip_score is not None else "")
                            for s in samples])
        self.titles.append(prompt or "(no caption)")

    def write(self) -> Path:
        """grid.png (the first 64 prompts), then samples.jsonl; returns the latter's path."""
        grid = labelled_grid(self.rows[:64], self.labels[:64], row_titles=self.titles[:64], label_lines=1)
        save_png(grid, self.out / "grid.png")
        path = self.out / "samples.jsonl"
        write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in self.lines))
        return path


def save_animation(frames: list[Image.Image], path: Path, milliseconds: int = 250) -> Path:
    """An animated GIF (looping, the last frame held) through a temporary file and a rename."""
    size = max(64, frames[-1].size[0])
    frames = [frame.convert("RGB").resize((size, size), Image.Resampling.NEAREST) for frame in frames]
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            frames[0].save(handle, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                           duration=[milliseconds] * (len(frames) - 1) + [4 * milliseconds])
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path
