"""How well `Pipeline.edit` redraws a region, read by the shapes picture reader.

  python scripts/edit_eval.py --model runs/shapes [--n 50] [--candidates 16] [--seed 0] [--device cpu]

(a) fill: a black 32-px picture, the box one quadrant, the prompt "a COLOUR SHAPE in the
    QUADRANT" (a training colour-shape pair and a quadrant drawn at random): are the codes
    outside the box unchanged (exactly), and does the reader find the asked colour and shape
    with its centre inside the box, in CLIP's top-1 of N?
(b) restore: a two-object test picture with one object erased, the box around where it
    was, the prompt the picture's own caption: does the reader find the whole caption true?
Prints one line per part and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dalle.data import shapes
from dalle.inference.editing import region_to_codes
from dalle.inference.pipeline import load_pipeline

QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}


def fill_blank_quadrants(pipeline, n: int, candidates: int, seed: int) -> dict:
    size = pipeline.image_size
    rng = np.random.default_rng(seed)
    blank = shapes.draw([], size)
    before = pipeline.encode_image(blank)[0].cpu()  # (N,)
    found, unchanged = [], []
    for index in range(n):
        colour, shape = shapes.TRAIN_PAIRS[rng.integers(len(shapes.TRAIN_PAIRS))]
        quadrant = list(QUADRANTS)[rng.integers(4)]
        qx, qy = QUADRANTS[quadrant]
        half = size // 2
        box = (qx * half, qy * half, qx * half + half, qy * half + half)
        prompt = shapes.caption_of(shapes.Scene(objects=((colour, shape),), position=quadrant))
        (best,) = pipeline.edit(blank, box, prompt, candidates=candidates, keep=1, seed=seed + index)
        redraw = region_to_codes(box, blank.size, size, pipeline.grid)
        unchanged.append(bool(torch.equal(best.codes[~redraw], before[~redraw])))
        objects = shapes.read_objects(best.image)
        found.append(any((o.colour, o.shape) == (colour, shape) and box[0] <= o.cx < box[2] and box[1] <= o.cy < box[3]
                         for o in objects))
    return {"fill_found": float(np.mean(found)), "fill_outside_unchanged": float(np.mean(unchanged)), "fill_n": n}


def restore_erased_objects(pipeline, n: int, candidates: int, seed: int) -> dict:
    size = pipeline.image_size
    rng = np.random.default_rng(seed + 1)
    right, index = [], 0
    while len(right) < n:
        scene = shapes.sample_scene("test", seed, index)
        geometry = shapes._rng("test", seed, index + 1_000_003)  # the stream `shapes.render` places with
        index += 1
        if scene.relation is None or set(scene.objects) & shapes.HELD_OUT:
            continue
        objects = shapes.place(scene, size, geometry)
        erased = objects[int(rng.integers(2))]
        picture = shapes.draw([o for o in objects if o is not erased], size)
        half = erased.side / 2 + 1
        box = (max(0, int(erased.cx - half)), max(0, int(erased.cy - half)),
               min(size, int(np.ceil(erased.cx + half))), min(size, int(np.ceil(erased.cy + half))))
        caption = shapes.caption_of(scene)
        (best,) = pipeline.edit(picture, box, caption, candidates=candidates, keep=1, seed=seed + index)
        right.append(shapes.judge(best.image, caption)["all"])
    return {"restore_caption_true": float(np.mean(right)), "restore_n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipeline = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    summary = fill_blank_quadrants(pipeline, args.n, args.candidates, args.seed)
    print(f"(a) fill a quadrant: asked colour and shape inside the box at top-1 of {args.candidates}: "
          f"{summary['fill_found']:.0%}; codes outside unchanged: {summary['fill_outside_unchanged']:.0%}")
    summary.update(restore_erased_objects(pipeline, args.n, args.candidates, args.seed))
    print(f"(b) restore an erased object: whole caption true at top-1 of {args.candidates}: "
          f"{summary['restore_caption_true']:.0%}")
    summary["seconds_per_edit"] = round((time.perf_counter() - started) / (2 * args.n), 2)
    summary.update(model=args.model, candidates=args.candidates, seed=args.seed)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
