"""Shape-twin pictures: the same place and colours, one outline changed, and their caption true of them."""

import numpy as np
import pytest

from dalle.config import load_config
from dalle.data import shapes
from dalle.data.twin_pictures import shape_twin
from dalle.errors import DalleError
from dalle.training.batches import image_caption_batches


def test_a_twin_changes_one_outline_in_place_and_its_caption_says_so():
    blanks = 0
    for index in range(300):
        image, caption = shapes.render("train", 0, index, 32)
        twin, twin_caption = shape_twin("train", 0, index, 32)
        assert not shapes.judge(twin, caption)["colour_shape"]  # false of the item's caption
        if twin_caption == "":  # no allowed change: the empty canvas
            assert not np.asarray(twin).any()
            blanks += 1
            continue
        assert shapes.judge(twin, twin_caption)["all"]  # true of its own, size and position included
        scene, twin_scene = shapes.parse_caption(caption), shapes.parse_caption(twin_caption)
        changed = [(a, b) for a, b in zip(scene.objects, twin_scene.objects) if a != b]
        assert len(changed) == 1 and changed[0][0][0] == changed[0][1][0]  # one object, same colour
        assert set(twin_scene.objects) <= set(shapes.TRAIN_PAIRS)  # never a held-out pair
        before, after = (sorted(shapes.read_objects(p), key=lambda o: (o.colour, o.cx)) for p in (image, twin))
        assert [o.colour for o in before] == [o.colour for o in after]
        assert all(abs(a.cx - b.cx) <= 1 and abs(a.cy - b.cy) <= 1 for a, b in zip(before, after))  # the same place
    assert blanks < 5
    again = shape_twin("train", 0, 7, 32)
    assert np.array_equal(np.asarray(again[0]), np.asarray(shape_twin("train", 0, 7, 32)[0]))


def test_batches_carry_one_twin_per_item_on_procedural_shapes_only():
    config = load_config(None, ["data.size=32"])
    batch = image_caption_batches(config, config.train.judge, progress=False, twins=True).batch_at(3)
    assert batch["twin_images"].shape == batch["images"].shape
    assert len(batch["twin_captions"]) == len(batch["captions"])
    assert all(twin != caption for twin, caption in zip(batch["twin_captions"], batch["captions"]))
    plain = image_caption_batches(config, config.train.judge, progress=False).batch_at(3)
    assert "twin_images" not in plain and plain["captions"] == batch["captions"]
    with pytest.raises(DalleError, match="procedural shapes data only"):
        image_caption_batches(load_config(None, ["data.n=16"]), config.train.judge, twins=True)
