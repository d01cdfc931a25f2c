"""Shape-twin pictures: a `shapes` dataset picture redrawn with one object as another shape, in the same place.

A caption's hardest wrong picture: the twin differs from the right one only in an object's
outline (a square's corners against a circle's curve), at the same colour, centre and size.
Added as extra pictures to a CLIP's caption-to-picture loss (`CLIP.forward`'s
`negative_images`), they teach it that outlines decide which caption a picture fits; the
judge of `dalle imagine` needs exactly that, since what imagine draws wrong is mostly the shape.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from PIL import Image

from dalle.data import shapes


def shape_twin(split: str, seed: int, index: int, size: int = 32,
               one_object_share: float = shapes.ONE_OBJECT_SHARE) -> tuple[Image.Image, str]:
    """Item `index`'s picture with one object drawn as another shape, and the canonical caption true of it.

    The object and its new shape are drawn from a stream of their own (the same triple gives
    the same twin). On the training split the new colour-shape pair is never a held-out one;
    two objects stay distinct. Where no change is allowed, the twin is the empty canvas with
    the empty caption (a picture that fits no caption).
    """
    scene, objects, _ = shapes.layout(split, seed, index, size, one_object_share)
    allowed = set(shapes.TRAIN_PAIRS if split == "train" else shapes.ALL_PAIRS)
    options = []
    for i, obj in enumerate(objects):
        for other in shapes.SHAPES:
            pairs = [(o.colour, o.shape) for o in objects]
            pairs[i] = (obj.colour, other)
            if other != obj.shape and pairs[i] in allowed and len(set(pairs)) == len(pairs):
                options.append((i, other))
    if not options:
        return shapes.draw([], size), ""
    rng = np.random.default_rng([shapes.SPLIT_IDS[split], seed, index, 2_000_003])
    i, other = options[int(rng.integers(len(options)))]
    twin = list(objects)
    twin[i] = replace(objects[i], shape=other)
    twin_scene = replace(scene, objects=tuple((o.colour, o.shape) for o in twin))
    return shapes.draw(twin, size), shapes.caption_of(twin_scene)
