"""The README's pictures of editing and streaming, drawn by a trained pipeline.

  python scripts/make_figures.py --model runs/demo/model --out docs/

docs/editing.png: rows of before | region | the best three edits (the region's codes redrawn
for the prompt, every other code kept). docs/stream.png: one prompt's candidates forming,
a column per two grid rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from dalle.data import shapes
from dalle.inference.pipeline import load_pipeline
from dalle.viz import labelled_grid, save_png

EDITS = [  # (picture index in the shapes test split, box, prompt)
    ("blank", (0, 0, 16, 16), "a red circle in the top left"),
    ("blank", (16, 16, 32, 32), "a yellow triangle in the bottom right"),
    (7, (0, 16, 32, 32), None),  # the bottom half redrawn for the picture's own caption
]


def region_picture(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255))
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pipeline = load_pipeline(args.model, device=args.device)
    size = pipeline.image_size
    rows, labels, titles = [], [], []
    for index, box, prompt in EDITS:
        if index == "blank":
            before = shapes.draw([], size)
        else:
            before, prompt = shapes.render("test", 0, index, size)
        edits = pipeline.edit(before, box, prompt, candidates=16, keep=3, seed=0)
        rows.append([before, region_picture(before.size, box), *[s.image for s in edits]])
        labels.append(["before", "region", *[f"#{s.rank} {s.clip_score:.1f}" for s in edits]])
        titles.append(prompt)
    out = Path(args.out)
    save_png(labelled_grid(rows, labels, row_titles=titles, cell=64, label_lines=1), out / "editing.png")
    prompt = "a green circle in the bottom right"
    frames = list(pipeline.stream(prompt, candidates=4, keep=4, seed=0, every_rows=2))
    columns = [[frame.images[i] for frame in frames] for i in range(4)]
    save_png(labelled_grid(columns, [[f"{f.rows} rows" for f in frames]] * 4, row_titles=[prompt] * 4, cell=64,
                           label_lines=1), out / "stream.png")
    print(out / "editing.png", out / "stream.png")


if __name__ == "__main__":
    main()
