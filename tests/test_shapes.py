import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from dalle.data import shapes


def test_palette_and_vocabulary_follow_the_contract():
    assert shapes.COLOURS["red"] == (220, 40, 40)
    assert shapes.COLOURS["white"] == (240, 240, 240)
    assert len(shapes.COLOURS) == 8 and shapes.SHAPES == ("circle", "square", "triangle")
    assert len(shapes.TRAIN_PAIRS) == 20


@pytest.mark.parametrize("size", [32, 64])
def test_exported_pictures_are_true_to_their_captions(size):
    # Our own reader, with the contract's geometry (0.25 S separation, less a pixel's rounding).
    for index in range(300):
        image, caption = shapes.render("test", 0, index, size)
        verdict = shapes.judge(image, caption, min_separation=0.25 - 1.5 / size)
        assert verdict["all"], (index, caption, verdict)
        pixels = np.asarray(image).reshape(-1, 3)
        allowed = {(0, 0, 0), *shapes.COLOURS.values()}
        assert {tuple(p) for p in np.unique(pixels, axis=0)} <= allowed


def test_no_held_out_pair_in_100k_training_captions():
    seen_pairs, colours, kinds = Counter(), Counter(), Counter()
    for index in range(100_000):
        scene = shapes.sample_scene("train", 0, index)
        for colour, shape in scene.objects:
            seen_pairs[(colour, shape)] += 1
            colours[colour] += 1
            kinds[shape] += 1
    assert not set(seen_pairs) & shapes.HELD_OUT
    assert set(colours) == set(shapes.COLOURS) and set(kinds) == set(shapes.SHAPES)


def test_test_split_uses_held_out_pairs():
    pairs = {p for i in range(2000) for p in shapes.sample_scene("test", 0, i).objects}
    assert shapes.HELD_OUT <= pairs


def test_canonical_captions_and_parser():
    assert shapes.caption_of(shapes.Scene(objects=(("orange", "triangle"),), position="center")) == (
        "an orange triangle in the center")
    scene = shapes.parse_caption("a green triangle to the left of a white circle")
    assert scene.relation == "to the left of" and scene.objects == (("green", "triangle"), ("white", "circle"))
    assert shapes.parse_caption("a small blue square in the top left").size == "small"
    assert shapes.parse_caption("a picture of a red circle").objects == (("red", "circle"),)
    assert shapes.parse_caption("a pink circle") is None


def test_same_triple_same_bytes_across_processes():
    code = ("import hashlib; from dalle.data.shapes import render; "
            "print(hashlib.sha256(b''.join(render('train', 3, i, 48)[0].tobytes() for i in range(50))).hexdigest())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
               for _ in range(2)}
    assert len(outputs) == 1
    local = __import__("hashlib").sha256(b"".join(shapes.render("train", 3, i, 48)[0].tobytes() for i in range(50)))
    assert outputs.pop().strip() == local.hexdigest()


def test_reader_rejects_wrong_pictures():
    image, caption = shapes.render("test", 0, 0, 32)
    scene = shapes.parse_caption(caption)
    colour, shape = scene.objects[0]
    other = next(c for c in shapes.COLOURS if c != colour)
    wrong = caption.replace(colour, other, 1)
    assert not shapes.judge(image, wrong)["colour_shape"]
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    assert not shapes.judge(blank, "a red circle")["all"]


def test_reads_same_compares_objects_sizes_and_verdicts():
    image, caption = shapes.render("test", 0, 3, 32)
    pixels = np.array(image)
    assert shapes.reads_same(pixels, pixels.copy(), caption)
    speck = pixels.copy()
    speck[0, 0] = (240, 240, 240)  # one stray pixel is below the reader's noise floor
    assert shapes.reads_same(pixels, speck, caption)
    recoloured = pixels.copy()
    colour = shapes.parse_caption(caption).objects[0][0]
    recoloured[(pixels != 0).any(axis=-1)] = (40, 180, 60) if colour != "green" else (220, 40, 40)
    assert not shapes.reads_same(pixels, recoloured, caption)
    assert not shapes.reads_same(pixels, np.zeros_like(pixels), caption)


def test_false_twins_are_false_of_the_picture_and_differ_in_one_respect():
    rng = np.random.default_rng(0)
    twins = Counter()
    for index in range(300):
        image, caption = shapes.render("test", 0, index, 32, paraphrase_prob=0.3)
        scene = shapes.parse_caption(caption)
        assert shapes.judge(image, caption)["all"]
        for kind in ("order", "binding", "attribute", "shape"):
            twin = shapes.false_twin(caption, rng, kind)
            if twin is None:
                continue
            twins[kind] += 1
            other = shapes.parse_caption(twin)
            assert other is not None and twin != caption
            # The reader calls a centred object's quadrant by the side of the middle it falls
            # on; by SHAPES.md a quadrant's object is clear of the middle, so the twin is false.
            if scene.position != "center":
                assert not shapes.judge(image, twin)["all"], (caption, twin)
            if kind == "order":
                assert sorted(other.objects) == sorted(scene.objects)
            if kind == "binding":  # the same colours and the same shapes, bound the other way
                assert sorted(c for c, _ in other.objects) == sorted(c for c, _ in scene.objects)
                assert sorted(s for _, s in other.objects) == sorted(s for _, s in scene.objects)
                assert sorted(other.objects) != sorted(scene.objects)
            if kind == "attribute":
                assert other.objects == scene.objects and other.relation is None
            if kind == "shape":  # one object's shape changed, nothing else
                changed = [(a, b) for a, b in zip(scene.objects, other.objects) if a != b]
                assert len(changed) == 1 and changed[0][0][0] == changed[0][1][0], (caption, twin)
                assert (other.size, other.position, other.relation) == (scene.size, scene.position, scene.relation)
    assert min(twins.values()) > 60, twins
    assert shapes.false_twin("a red circle", rng) is None  # shape twins only when asked for
    assert shapes.false_twin("a red circle", rng, "shape") in ("a red square", "a red triangle")
    # Training never names a held-out pair, even in a negative: purple has no triangle twin.
    assert {shapes.false_twin("a purple circle", rng, "shape", pairs=shapes.TRAIN_PAIRS)
            for _ in range(20)} == {"a purple square"}
    # Two objects stay two different objects: a red square never becomes the other red circle.
    assert {shapes.false_twin("a red square above a red circle", rng, "shape") for _ in range(30)} == {
        "a red triangle above a red circle", "a red square above a red triangle"}
    assert shapes.false_twin("a red circle above a red circle", rng, "binding") is None
    assert shapes.false_twin("a blue square above a red circle", rng, "order") in (
        "a red circle above a blue square", "a blue square below a red circle")
    assert shapes.false_twin("a blue square above a red square", rng, "binding") is None  # a swap only reorders
    assert shapes.false_twin("there is a blue square above a red circle", rng, "binding") in (
        "there is a red square above a blue circle", "there is a blue circle above a red square")
    assert shapes.false_twin("not a caption", rng) is None


def test_one_object_share_changes_the_mix_and_the_default_is_the_dataset():
    def share(**kw):
        scenes = [shapes.sample_scene("train", 0, i, **kw) for i in range(2000)]
        return sum(s.relation is None for s in scenes) / len(scenes)

    assert 0.57 < share() < 0.63
    assert 0.87 < share(one_object_share=0.9) < 0.93
    assert share(one_object_share=1.0) == 1.0
    default = [shapes.render("train", 0, i) for i in range(20)]
    explicit = [shapes.render("train", 0, i, one_object_share=shapes.ONE_OBJECT_SHARE) for i in range(20)]
    assert [c for _, c in default] == [c for _, c in explicit]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(default, explicit))
