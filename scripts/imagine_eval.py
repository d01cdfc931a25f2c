"""How well `dalle imagine` draws one-object shapes prompts, read by the shapes picture reader.

  python scripts/imagine_eval.py --model runs/shapes [--n 50] [--steps 100] [--init random|sample] [--seed 0]
      [--smoothness W] [--restarts R]

For each one-object test prompt: the asked colour found (an object of that colour), the asked
colour and shape (`shapes.judge`: exactly that object), and the seconds per picture. With
restarts, also how many of all the restarts' pictures show the colour and shape, and for how
many prompts at least one does (what a perfect ranker would reach).
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from dalle.data import shapes
from dalle.evaluation.evaluate import prompt_sets
from dalle.inference.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--init", choices=["random", "sample"], default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoothness", type=float, help="default: 1 with the model's judge/, else 0")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    pipeline = load_pipeline(args.model, device=args.device)
    prompts = prompt_sets(args.n, seed=args.seed)["one_object"]
    colour, colour_shape, each_restart, any_restart = [], [], [], []
    seconds = 0.0  # imagine's own time, not the reading
    for index, prompt in enumerate(prompts):
        started = time.perf_counter()
        found = pipeline.imagine(prompt, steps=args.steps, seed=args.seed + index, init=args.init,
                                 smoothness=args.smoothness, restarts=args.restarts, progress=False)
        seconds += time.perf_counter() - started
        asked = shapes.parse_caption(prompt).objects[0]
        objects = shapes.read_objects(found.image)
        colour.append(any(o.colour == asked[0] for o in objects))
        colour_shape.append(shapes.judge(found.image, prompt)["colour_shape"])
        right = [shapes.judge(picture, prompt)["colour_shape"] for picture in found.candidate_images]
        each_restart.append(np.mean(right))
        any_restart.append(any(right))
    seconds /= len(prompts)
    summary = {"colour": float(np.mean(colour)), "colour_shape": float(np.mean(colour_shape)), "n": len(prompts),
               "colour_shape_each_restart": float(np.mean(each_restart)),
               "colour_shape_any_restart": float(np.mean(any_restart)),
               "seconds_per_picture": round(seconds, 2), "steps": args.steps, "init": args.init, "seed": args.seed,
               "smoothness": args.smoothness, "restarts": args.restarts,
               "model": args.model}
    print(f"asked colour found: {summary['colour']:.0%}; colour and shape: {summary['colour_shape']:.0%} "
          f"({len(prompts)} prompts, {seconds:.1f} s a picture, init {args.init}); of every restart's picture "
          f"{summary['colour_shape_each_restart']:.0%}, at least one restart {summary['colour_shape_any_restart']:.0%}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
