"""The built-in `shapes` caption dataset and the reader of its pictures.

Everything here follows ../shared/SHAPES.md to the letter: outside checks build prompts
from this grammar and read generated images by this palette. Drawing is plain numpy on
pixel centres (no anti-aliasing, no font or library rasteriser), so a (split, seed,
index) triple gives byte-identical pictures on any machine.

The reader (`read_objects`, `judge`) is the project's one picture reader: it snaps pixels
to the palette, finds connected components, and tells circle / square / triangle apart by
which corners of its bounding box a component fills.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dalle.errors import DalleError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "cyan": (40, 200, 220),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
RELATIONS = ("above", "below", "to the left of", "to the right of")
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("cyan", "square"), ("white", "triangle")}
)
ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
TRAIN_PAIRS = [pair for pair in ALL_PAIRS if pair not in HELD_OUT]

# Bounding-box side as a fraction of the canvas (SHAPES.md), and the range used when the
# caption names no size.
SIZE_RANGE = {"small": (0.20, 0.26), "large": (0.40, 0.46), None: (0.20, 0.46)}
TWO_OBJECT_SIZE = (0.20, 0.32)  # two objects must fit side by side without touching
MIN_SEPARATION = 0.25  # centres apart along the relation's axis, as a fraction of S
SPLIT_IDS = {"train": 1, "test": 2}
PARAPHRASES = ("a picture of {}", "an image of {}", "a drawing of {}", "there is {}")


@dataclass(frozen=True)
class ShapeObject:
    """One flat-filled object: centre and bounding-box side in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    side: float


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: one or two objects and their attributes."""

    objects: tuple[tuple[str, str], ...]  # (colour, shape) per object
    size: str | None = None  # one object only
    position: str | None = None  # one object only
    relation: str | None = None  # two objects only: objects[0] RELATION objects[1]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(scene: Scene) -> str:
    """The canonical caption of a scene (SHAPES.md)."""
    if scene.relation is None:
        colour, shape = scene.objects[0]
        words = " ".join(w for w in (scene.size, colour, shape) if w)
        text = f"{article(words)} {words}"
        if scene.position:
            text += f" in the {scene.position}"
        return text
    (c1, s1), (c2, s2) = scene.objects
    return f"{article(c1)} {c1} {s1} {scene.relation} {article(c2)} {c2} {s2}"


_SHAPE = "(circle|square|triangle)"
_ONE = re.compile(
    rf"^an? (?:(small|large) )?(\w+) {_SHAPE}"
    r"(?: in the (top left|top right|bottom left|bottom right|center))?$"
)
_TWO = re.compile(rf"^an? (\w+) {_SHAPE} (above|below|to the left of|to the right of) an? (\w+) {_SHAPE}$")


def parse_caption(text: str) -> Scene | None:
    """Parses a canonical caption (paraphrase prefixes allowed); None if it is not one."""
    text = " ".join(text.lower().strip().rstrip(".").split())
    for template in PARAPHRASES:
        prefix = template.format("")
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    match = _ONE.match(text)
    if match and match.group(2) in COLOURS:
        size, colour, shape, position = match.groups()
        return Scene(objects=((colour, shape),), size=size, position=position)
    match = _TWO.match(text)
    if match and match.group(1) in COLOURS and match.group(4) in COLOURS:
        c1, s1, relation, c2, s2 = match.groups()
        return Scene(objects=((c1, s1), (c2, s2)), relation=relation)
    return None


# ----------------------------------------------------------------------------- drawing


def draw(objects: list[ShapeObject], size: int) -> Image.Image:
    """Rasterises objects on a black canvas by testing pixel centres."""
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, (S, S) each
    for obj in objects:
        half = obj.side / 2
        dx, dy = xs - obj.cx, ys - obj.cy
        if obj.shape == "circle":
            inside = dx * dx + dy * dy <= half * half
        elif obj.shape == "square":
            inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
        else:  # isosceles triangle, apex up: half-width grows linearly from apex to base
            depth = dy + half  # 0 at the apex row, side at the base
            inside = (depth >= 0) & (depth <= obj.side) & (np.abs(dx) <= depth / 2)
        canvas[inside] = COLOURS[obj.colour]
    return Image.fromarray(canvas, mode="RGB")


def check_size(size: int) -> None:
    """Shapes are drawn on 32 pixels at least (a size from the user's config or flags: one line)."""
    if size < 32:
        raise DalleError(f"shapes images need size >= 32, got {size}")


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}: train or test")
    return np.random.default_rng([SPLIT_IDS[split], seed, index])


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


ONE_OBJECT_SHARE = 0.6  # of the scenes; the rest have two objects and a relation


def sample_scene(split: str, seed: int, index: int, one_object_share: float = ONE_OBJECT_SHARE) -> Scene:
    """The scene (what the caption says) of one dataset item.

    `one_object_share` changes the mix of one- and two-object scenes (a training choice,
    e.g. for a short run that must first learn single objects); the default is the dataset.
    """
    rng = _rng(split, seed, index)
    pairs = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    if rng.random() < one_object_share:
        colour, shape = _pick(rng, pairs)
        size = _pick(rng, (None, None, "small", "large"))
        position = _pick(rng, (None, None, *POSITIONS))
        return Scene(objects=((colour, shape),), size=size, position=position)
    first = _pick(rng, pairs)
    second = _pick(rng, [pair for pair in pairs if pair != first])
    return Scene(objects=(first, second), relation=_pick(rng, RELATIONS))


def place(scene: Scene, size: int, rng: np.random.Generator) -> list[ShapeObject]:
    """Chooses sizes and centres (pixels) that make the scene's caption true."""
    if scene.relation is None:
        colour, shape = scene.objects[0]
        low, high = SIZE_RANGE[scene.size]
        side = rng.uniform(low, high) * size
        half = side / 2
        mid = size / 2
        if scene.position == "center":
            radius = 0.08 * size * np.sqrt(rng.random())
            angle = rng.uniform(0, 2 * np.pi)
            cx, cy = mid + radius * np.cos(angle), mid + radius * np.sin(angle)
        elif scene.position is None:
            cx, cy = rng.uniform(half, size - half, size=2)
        else:  # a quadrant, centre clear of the middle lines by 0.1 S
            clear = 0.1 * size
            near, far = (half, mid - clear) if half < mid - clear else (mid - clear, mid - clear)
            cx = rng.uniform(near, far)
            cy = rng.uniform(near, far)
            if "right" in scene.position:
                cx = size - cx
            if "bottom" in scene.position:
                cy = size - cy
        return [ShapeObject(colour, shape, float(cx), float(cy), float(side))]

    sides = rng.uniform(*TWO_OBJECT_SIZE, size=2) * size
    gap = 0.04 * size  # keeps the two bounding boxes apart, so components never merge
    separation = max(MIN_SEPARATION * size, (sides[0] + sides[1]) / 2 + gap)
    # Place along the relation's axis: the first object's coordinate minus the second's.
    sign = -1.0 if scene.relation in ("above", "to the left of") else 1.0
    lo = max(sides[0], sides[1]) / 2
    first_lo, first_hi = sides[0] / 2, size - sides[0] / 2
    second_lo, second_hi = sides[1] / 2, size - sides[1] / 2
    if sign < 0:  # first is before second: first + separation <= second
        a = rng.uniform(first_lo, max(first_lo, second_hi - separation))
        b = rng.uniform(a + separation, max(a + separation, second_hi))
    else:
        b = rng.uniform(second_lo, max(second_lo, first_hi - separation))
        a = rng.uniform(b + separation, max(b + separation, first_hi))
    across = rng.uniform(lo, size - lo, size=2)
    (c1, s1), (c2, s2) = scene.objects
    if scene.relation in ("above", "below"):
        centres = [(across[0], a), (across[1], b)]
    else:
        centres = [(a, across[0]), (b, across[1])]
    return [
        ShapeObject(c1, s1, float(centres[0][0]), float(centres[0][1]), float(sides[0])),
        ShapeObject(c2, s2, float(centres[1][0]), float(centres[1][1]), float(sides[1])),
    ]


def layout(split: str, seed: int, index: int, size: int = 32,
           one_object_share: float = ONE_OBJECT_SHARE) -> tuple[Scene, list[ShapeObject], np.random.Generator]:
    """One dataset item's scene, its placed objects, and its geometry stream after placing them."""
    check_size(size)
    scene = sample_scene(split, seed, index, one_object_share)
    rng = _rng(split, seed, index + 1_000_003)  # a separate stream for geometry
    return scene, place(scene, size, rng), rng


def render(split: str, seed: int, index: int, size: int = 32, paraphrase_prob: float = 0.0,
           one_object_share: float = ONE_OBJECT_SHARE) -> tuple[Image.Image, str]:
    """The (image, caption) of one dataset item; the same triple gives the same bytes.

    Args:
        split: "train" (no held-out colour-shape pair) or "test" (the full grammar).
        seed: the dataset seed.
        index: the item number.
        size: the canvas side in pixels (>= 32).
        paraphrase_prob: chance of a non-canonical caption ("a picture of ...").
        one_object_share: the share of one-object scenes (see `sample_scene`).
    """
    scene, objects, rng = layout(split, seed, index, size, one_object_share)
    caption = caption_of(scene)
    if paraphrase_prob > 0 and rng.random() < paraphrase_prob:
        caption = _pick(rng, PARAPHRASES).format(caption)
    return draw(objects, size), caption


OPPOSITE_RELATION = {"above": "below", "below": "above", "to the left of": "to the right of",
                     "to the right of": "to the left of"}


TRAINING_TWINS = ("order", "binding", "attribute")  # the kinds `false_twin` draws from by default


def false_twin(caption: str, rng: np.random.Generator, kind: str | None = None,
               pairs: list[tuple[str, str]] | None = None) -> str | None:
    """A caption that differs from `caption` in one respect only and is false of its picture.

    Kinds of change:
      - "order" (two objects): the objects swapped or the relation reversed ("a red circle
        above a blue square" -> "a blue square above a red circle");
      - "binding" (two objects): their colours or their shapes swapped ("a blue circle
        above a red square");
      - "attribute" (one object): another position, or the other size;
      - "shape" (any): one object drawn as another shape ("a red circle" -> "a red square").
    `kind` None picks one of TRAINING_TWINS (order, binding, attribute) that applies to the
    caption; "shape" twins only come when asked for. They measure whether a CLIP sees shapes
    (`evaluate_clip_twins`). As training negatives they dilute the order twins: a
    2000-update CLIP trained with all four kinds scored order twins at chance (0.51).
    Returns None when no kind applies (a bare "a red circle" has no "attribute" twin;
    "binding" needs two objects that differ in colour and in shape) or the caption is not
    in the grammar. A paraphrase keeps its prefix. `pairs`: the colour-shape pairs a twin
    may name (training passes TRAIN_PAIRS, so that no held-out pair appears even as a
    negative); None: any.

    CLIP trained on random batches almost never meets two captions with the same words in
    another order, so it can score a caption as a bag of words; these twins, added as
    extra negatives, make order and binding matter (NegCLIP, Yuksekgonul et al. 2023).
    """
    scene = parse_caption(caption)
    if scene is None:
        return None
    changes: dict[str, list[Scene]] = {"order": [], "binding": [], "attribute": [], "shape": []}
    if scene.relation is not None:
        (c1, s1), (c2, s2) = scene.objects
        changes["order"] = [Scene(objects=scene.objects[::-1], relation=scene.relation),
                            Scene(objects=scene.objects, relation=OPPOSITE_RELATION[scene.relation])]
        if c1 != c2 and s1 != s2:  # with one colour (or shape) for both, a swap only reorders
            changes["binding"] = [Scene(objects=((c2, s1), (c1, s2)), relation=scene.relation),
                                  Scene(objects=((c1, s2), (c2, s1)), relation=scene.relation)]
    else:
        if scene.position:
            changes["attribute"] += [Scene(scene.objects, scene.size, p) for p in POSITIONS if p != scene.position]
        if scene.size:
            changes["attribute"].append(
                Scene(scene.objects, "large" if scene.size == "small" else "small", scene.position))
    for i, (colour, shape) in enumerate(scene.objects):
        for other in SHAPES:
            objects = list(scene.objects)
            objects[i] = (colour, other)
            if other != shape and len(set(objects)) == len(objects):  # two objects stay distinct
                changes["shape"].append(Scene(tuple(objects), scene.size, scene.position, scene.relation))
    if pairs is not None:
        allowed = set(pairs)
        changes = {k: [t for t in options if set(t.objects) <= allowed] for k, options in changes.items()}
    wanted = TRAINING_TWINS if kind is None else (kind,)
    kinds = [k for k, options in changes.items() if options and k in wanted]
    if not kinds:
        return None
    options = changes[kinds[int(rng.integers(len(kinds)))]]
    twin = options[int(rng.integers(len(options)))]
    text = caption.replace(caption_of(scene), caption_of(twin))
    return text if text != caption else None  # e.g. odd spacing: the canonical words not found


def all_captions_single() -> list[str]:
    """The 24 colour-shape labels ("a red circle", ...)."""
    return [caption_of(Scene(objects=(pair,))) for pair in ALL_PAIRS]


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DetectedObject:
    """A connected component of one palette colour, measured in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    width: int
    height: int
    area: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)


_PALETTE = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.float32)  # index 0: background
_NAMES = ["background", *COLOURS]


def snap_to_palette(pixels: np.ndarray, max_distance: float = 90.0) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) palette index; 0 for background or off-palette pixels."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    distances = ((flat[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)  # (HW, 9)
    nearest = distances.argmin(1)
    nearest[np.sqrt(distances.min(1)) > max_distance] = 0
    return nearest.reshape(pixels.shape[:2])


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack = [(y0, x0)]
        seen[y0, x0] = True
        pixels = []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(pixels))
    return found


def classify_shape(pixels: np.ndarray) -> str:
    """Circle, square or triangle from a component's (n, 2) (y, x) pixels.

    Small shapes rasterise ambiguously (a 7-pixel circle fills 90% of its box), so the
    reader looks at the corners of the bounding box: a square fills all four, a triangle
    (apex up) only the bottom two, a circle none.
    """
    ys, xs = pixels[:, 0] - pixels[:, 0].min(), pixels[:, 1] - pixels[:, 1].min()
    height, width = ys.max() + 1, xs.max() + 1
    box = np.zeros((height, width), dtype=bool)
    box[ys, xs] = True
    k = max(1, round(min(height, width) / 6))  # corner patch side
    top = (box[:k, :k].mean() + box[:k, -k:].mean()) / 2
    bottom = (box[-k:, :k].mean() + box[-k:, -k:].mean()) / 2
    if top >= 0.5 and bottom >= 0.5:
        return "square"
    if bottom - top >= 0.4:
        return "triangle"
    return "circle"


def read_objects(image: Image.Image | np.ndarray, min_area_fraction: float = 0.008) -> list[DetectedObject]:
    """Finds the flat-coloured objects of a picture, largest first.

    Args:
        image: an RGB PIL image or (H, W, 3) uint8 array.
        min_area_fraction: components smaller than this share of the canvas are noise.
    """
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = snap_to_palette(pixels)
    min_area = max(4, int(min_area_fraction * labels.size))
    objects = []
    for index in range(1, len(_NAMES)):
        for component in _components(labels == index):
            if len(component) < min_area:
                continue
            ys, xs = component[:, 0], component[:, 1]
            objects.append(DetectedObject(
                colour=_NAMES[index], shape=classify_shape(component),
                cx=float(xs.min() + xs.max() + 1) / 2, cy=float(ys.min() + ys.max() + 1) / 2,  # box centre
                width=int(xs.max() - xs.min() + 1), height=int(ys.max() - ys.min() + 1), area=len(component),
            ))
    return sorted(objects, key=lambda obj: -obj.area)


def _size_word(side: float, canvas: int) -> str | None:
    fraction = side / canvas
    if fraction <= 0.30:
        return "small"
    if fraction >= 0.36:
        return "large"
    return None


def _position_holds(obj: DetectedObject, position: str, canvas: int) -> bool:
    mid = canvas / 2
    if position == "center":
        return np.hypot(obj.cx - mid, obj.cy - mid) <= 0.12 * canvas
    vertical, horizontal = position.split()
    ok_y = obj.cy < mid if vertical == "top" else obj.cy > mid
    ok_x = obj.cx < mid if horizontal == "left" else obj.cx > mid
    return ok_y and ok_x


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str, canvas: int, min_separation: float) -> bool:
    gaps = {"above": b.cy - a.cy, "below": a.cy - b.cy, "to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx}
    return gaps[relation] >= min_separation * canvas


def reads_same(original: Image.Image | np.ndarray, copy: Image.Image | np.ndarray, caption: str) -> bool:
    """Whether the reader reads a copy of a picture (e.g. a dVAE reconstruction) as the original:
    the same objects (colour and shape) and the same verdict on every part of its caption
    (size, position, relation where the caption asks for them).

    A size word the caption does not ask for is not compared: a circle 10 pixels across at
    S = 32 sits on the small / in-between border (0.30 S), where one pixel flips the word.
    """
    def read(image):
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        return sorted((o.colour, o.shape) for o in read_objects(pixels))

    return read(original) == read(copy) and judge(original, caption) == judge(copy, caption)


def judge(image: Image.Image | np.ndarray, caption: str, min_separation: float = 0.15) -> dict[str, bool]:
    """Reads a picture and says which parts of a canonical caption it shows.

    Returns a dict with `parsed` (the caption is in the grammar), `colour_shape` (the asked
    objects, and only they, are there), the attribute checks that apply (`size`,
    `position`, `relation`), and `all` (every check passed).
    """
    scene = parse_caption(caption)
    if scene is None:
        return {"parsed": False, "colour_shape": False, "all": False}
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    canvas = pixels.shape[0]
    found = read_objects(pixels)
    result: dict[str, bool] = {"parsed": True}
    if scene.relation is None:
        colour, shape = scene.objects[0]
        ok = len(found) == 1 and (found[0].colour, found[0].shape) == (colour, shape)
        result["colour_shape"] = ok
        if scene.size:
            result["size"] = ok and _size_word(found[0].side, canvas) == scene.size
        if scene.position:
            result["position"] = ok and _position_holds(found[0], scene.position, canvas)
    else:
        ok = len(found) == 2 and sorted((o.colour, o.shape) for o in found) == sorted(scene.objects)
        result["colour_shape"] = ok
        if ok:
            by_pair = {(o.colour, o.shape): o for o in found}
            first, second = by_pair[scene.objects[0]], by_pair[scene.objects[1]]
            result["relation"] = _relation_holds(first, second, scene.relation, canvas, min_separation)
        else:
            result["relation"] = False
    result["all"] = all(value for key, value in result.items() if key != "parsed")
    return result
