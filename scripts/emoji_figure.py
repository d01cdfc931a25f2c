"""The README's emoji picture: real pictures beside the pipeline's best three of 16 for their captions.

  python scripts/emoji_figure.py --model runs/emoji --data data/emoji --out docs/emoji.png

Rows: seen captions (training folder), held-out tones and held-out styles (from split.json),
`--rows` of each, drawn at random with `--seed`; columns: the real picture, then the CLIP's
first three picks of 16 candidates.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from dalle.inference.pipeline import load_pipeline
from dalle.viz import labelled_grid, save_png


def pick(folder: Path, stems: list[str], count: int, rng: random.Random) -> list[tuple[Image.Image, str]]:
    """`count` (picture, caption) pairs of `folder`, among `stems`."""
    chosen = rng.sample(sorted(stems), count)
    return [(Image.open(folder / f"{stem}.png").convert("RGB"), (folder / f"{stem}.txt").read_text().strip())
            for stem in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the folder `dalle data fetch emoji` wrote")
    parser.add_argument("--out", default="docs/emoji.png")
    parser.add_argument("--rows", type=int, default=3, help="rows of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    data = Path(args.data)
    held = json.loads((data / "split.json").read_text(encoding="utf-8"))["held_out"]
    rng = random.Random(args.seed)
    train_stems = [p.stem for p in (data / "train").glob("*.png")]
    cases = [("seen", *pair) for pair in pick(data / "train", train_stems, args.rows, rng)]
    for kind in ("tone", "style"):
        cases += [(f"held-out {kind}", *pair) for pair in pick(data / "test", held[kind], args.rows, rng)]
    pipeline = load_pipeline(args.model, device=args.device)
    rows, labels, titles = [], [], []
    for kind, real, caption in cases:
        (samples,) = pipeline([caption], candidates=16, keep=3, seed=args.seed)
        rows.append([real.resize((pipeline.image_size,) * 2), *[s.image for s in samples]])
        labels.append(["real", *[f"#{s.rank}" for s in samples]])
        titles.append(f"{caption} ({kind})")
    save_png(labelled_grid(rows, labels, row_titles=titles, cell=64, label_lines=1), Path(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
