"""Streaming sources split across processes and data-loader workers: each item once per epoch."""

import io
import json
import tarfile
from collections import Counter

import pytest
import torch

from dalle.config import DataConfig
from dalle.data import shapes
from dalle.data.sources import ShardedStream, open_source
from dalle.training.batches import StreamBatches


def write_shards(root, sizes):
    """WebDataset shards of uneven sizes; captions carry a unique item number."""
    number = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(root / f"shard-{shard:02d}.tar", "w") as tar:
            for _ in range(size):
                image, caption = shapes.render("train", 0, number, 32)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                for suffix, payload in (("png", buffer.getvalue()), ("txt", f"{number} {caption}".encode())):
                    info = tarfile.TarInfo(f"{number:05d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                number += 1
    return number


def seen_items(spec, config, processes=2, workers=2):
    seen = Counter()
    for process in range(processes):
        stream = ShardedStream(lambda: open_source(spec, config), process, processes)
        loader = torch.utils.data.DataLoader(stream, batch_size=3, num_workers=workers,
                                             collate_fn=lambda items: [c for _, c in items])
        for batch in loader:
            seen.update(int(caption.split()[0]) for caption in batch)
    return seen


def test_webdataset_two_processes_two_workers_each_item_once(tmp_path):
    total = write_shards(tmp_path, [5, 7, 4])
    seen = seen_items(f"wds:{tmp_path}/shard-*.tar", DataConfig(size=32))
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}


def test_hf_streaming_two_processes_two_workers_each_item_once(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    with open(train / "metadata.jsonl", "w") as handle:
        for i in range(11):
            shapes.render("train", 0, i, 32)[0].save(train / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "text": f"{i} a picture"}) + "\n")
    seen = seen_items(f"hf:{tmp_path}", DataConfig(size=32, streaming=True))
    assert sorted(seen) == list(range(11)) and set(seen.values()) == {1}


def test_stream_batches_resume_at_a_step_and_wrap_epochs(tmp_path):
    write_shards(tmp_path, [4, 3])
    config = DataConfig(size=32)
    make = lambda: StreamBatches(ShardedStream(lambda: open_source(f"wds:{tmp_path}/*.tar", config)), 2)  # noqa: E731
    straight = make()
    captions = [straight.batch_at(step)["captions"] for step in range(6)]  # 7 items, batches of 2: wraps
    assert straight.batch_at(6)["images"].shape == (2, 3, 32, 32)
    flat = [c for batch in captions for c in batch]
    assert sorted(flat[:7], key=lambda c: int(c.split()[0]))[0].startswith("0 ")  # epoch 1 is all 7 items
    assert len({c.split()[0] for c in flat[:7]}) == 7
    resumed = make()
    assert resumed.batch_at(4)["captions"] == captions[4]
    assert resumed.batch_at(5)["captions"] == captions[5]


@pytest.mark.slow
def test_training_on_webdataset_shards(tmp_path):
    from dalle.config import load_config
    from dalle.training import stages

    from .conftest import TINY

    write_shards(tmp_path, [6, 6])
    config = load_config(TINY, [f"run_dir={tmp_path / 'run'}", f"data.source=wds:{tmp_path}/*.tar",
                                "train.dvae.steps=3", "train.transformer.steps=3", "train.transformer.num_workers=2"])
    stages.train_dvae(config, progress=False)
    stages.train_transformer(config, progress=False)
    assert (tmp_path / "run" / "transformer" / "model.safetensors").is_file()
