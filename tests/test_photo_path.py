"""The photo path of configs/coco-256.yaml: its models at full size on the meta device, the
brace patterns of `wds:` sources, and the whole path in miniature: OpenAI's dVAE architecture
converted by the real converter, img2dataset-style shards, train-all, generate and eval.

dall_e is installed by scripts/setup.sh (as in tests/test_convert.py): imported plainly.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import dall_e
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from dalle.cli import main
from dalle.config import DataConfig, load_config
from dalle.data.sources import DataError, expand_braces, open_source, shard_paths
from dalle.models.clip import CLIP
from dalle.models.transformer import DalleTransformer, parameter_count

COCO = Path(__file__).resolve().parents[1] / "configs" / "coco-256.yaml"
STATED_PARAMETERS = 352_905_216  # the transformer's count in the config's comment
COLOURS = {"red": (200, 40, 30), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 200, 40),
           "white": (235, 235, 235), "black": (20, 20, 20)}
SIDE = 64


# ----------------------------------------------------------------------------- (a) the config at full size


def test_coco_config_builds_on_the_meta_device():
    config = load_config(COCO)
    t = config.transformer
    assert config.data.source.startswith("wds:") and config.data.size == 256 and config.dvae.pretrained
    assert (t.text_len, t.text_vocab) == (config.tokenizer.text_len, config.tokenizer.vocab_size + t.text_len)
    assert (t.image_vocab, t.image_grid) == (8192, 32)  # OpenAI's dVAE at 256 px
    with torch.device("meta"):
        model = DalleTransformer(t)
        clip = CLIP(replace(config.clip, image_size=config.data.size))
    count = parameter_count(model)
    assert count == pytest.approx(STATED_PARAMETERS, rel=0.01)
    assert f"{STATED_PARAMETERS:,}" in COCO.read_text() and "353M" in COCO.read_text()
    assert model.patterns[-1] == "conv" and model.patterns.count("column") == t.depth // 4
    assert sum(p.numel() for p in clip.parameters()) == pytest.approx(48e6, rel=0.02)  # "48M" in the config


# ----------------------------------------------------------------------------- (b) brace patterns


@pytest.mark.parametrize("pattern, names", [
    ("s/{00000..00002}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar"]),
    ("{8..11}", ["8", "9", "10", "11"]),
    ("{08..11}", ["08", "09", "10", "11"]),  # a leading zero pads to the wider end
    ("{3..1}", ["3", "2", "1"]),
    ("{a,b}-{1..2}", ["a-1", "a-2", "b-1", "b-2"]),
    ("d/{cc3m/{0..1},coco/0}.tar", ["d/cc3m/0.tar", "d/cc3m/1.tar", "d/coco/0.tar"]),
    ("{,x}y", ["y", "xy"]),
    ("plain/*.tar", ["plain/*.tar"]),
    ("a{b}c", ["a{b}c"]),  # neither a list nor a range: kept
    ("a{1..2", ["a{1..2"]),  # unclosed: kept
])
def test_brace_expansion(pattern, names):
    assert expand_braces(pattern) == names


def test_shard_patterns_match_files_or_name_the_pattern(tmp_path):
    for name in ("00000.tar", "00001.tar", "00003.tar", "00000_stats.json"):
        (tmp_path / name).write_bytes(b"")
    found, missing = shard_paths(f"{tmp_path}/{{00000..00003}}.tar")
    assert found == [str(tmp_path / f"0000{i}.tar") for i in (0, 1, 3)] and missing == [str(tmp_path / "00002.tar")]
    assert shard_paths(f"{tmp_path}/{{00001,00000,00001}}.tar")[0] == [str(tmp_path / "00001.tar"),
                                                                      str(tmp_path / "00000.tar")]
    assert shard_paths(f"{tmp_path}/0000[01].tar")[0] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    pattern = f"{tmp_path}/{{00010..00019}}.tar"
    with pytest.raises(DataError) as error:
        open_source(f"wds:{pattern}", DataConfig())
    assert str(error.value) == f"no shards match {pattern!r}"
    with pytest.raises(DataError, match="more than 1,000,000 shards"):
        expand_braces("{0..999}{0..999}{0..9}")


# ----------------------------------------------------------------------------- (c) the path in miniature


def photo(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A 64-px natural-ish picture (a gradient, a soft blob, grain) and its caption."""
    sky, ground, thing = rng.choice(list(COLOURS), size=3, replace=False)
    rows = np.linspace(0.0, 1.0, SIDE)[:, None, None]  # (H, 1, 1)
    pixels = (1 - rows) * np.array(COLOURS[sky]) + rows * np.array(COLOURS[ground])  # (H, 1, 3)
    image = Image.fromarray(np.broadcast_to(pixels, (SIDE, SIDE, 3)).astype(np.uint8))
    x, y, r = (int(v) for v in rng.integers([12, 12, 6], [52, 52, 16]))
    blob = Image.new("L", (SIDE, SIDE))
    ImageDraw.Draw(blob).ellipse((x - r, y - r, x + r, y + r), fill=255)
    image.paste(Image.new("RGB", (SIDE, SIDE), COLOURS[thing]), mask=blob.filter(ImageFilter.GaussianBlur(2)))
    grain = rng.normal(0, 8, (SIDE, SIDE, 3))
    image = Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
    where = "high" if y < 32 else "low"
    return image, f"a {thing} ball {where} in a {sky} and {ground} sky\na photo of a {thing} ball"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_img2dataset_shard(path: Path, shard: int, pairs: list[tuple[Image.Image, str]]) -> None:
    """As img2dataset writes `--output_format webdataset`: KEY.jpg, KEY.json, KEY.txt per sample
    (KEY: the shard's 5 digits and the sample's 4), and NNNNN_stats.json beside the tar."""
    with tarfile.open(path / f"{shard:05d}.tar", "w") as tar:
        for index, (image, caption) in enumerate(pairs):
            key = f"{shard:05d}{index:04d}"
            meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                    "width": SIDE, "height": SIDE}
            for suffix, data in (("jpg", jpeg(image)), ("json", json.dumps(meta).encode()),
                                 ("txt", caption.encode())):
                member = tarfile.TarInfo(f"{key}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    (path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(pairs), "successes": len(pairs)}))


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """Shards, a converted random OpenAI-architecture dVAE, and every other stage trained by train-all."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    pairs = [photo(rng) for _ in range(40)]
    shards = root / "shards"
    shards.mkdir()
    write_img2dataset_shard(shards, 0, pairs[:16])
    write_img2dataset_shard(shards, 1, pairs[16:32])
    test = root / "test"  # held-out pictures, the folder format `dalle eval --data folder:` reads
    test.mkdir()
    for index, (image, caption) in enumerate(pairs[32:]):
        image.save(test / f"{index:05d}.jpg", quality=90)
        (test / f"{index:05d}.txt").write_text(caption.splitlines()[0] + "\n")

    torch.manual_seed(0)
    # The smallest sizes dall_e accepts (n_hid >= 64, vocab_size >= 512): 64 px -> an 8x8 grid.
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), root / "encoder.pkl")
    torch.save(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), root / "decoder.pkl")
    dvae = root / "openai-dvae"
    assert main(["convert", "openai-dvae", "--encoder", str(root / "encoder.pkl"), "--decoder",
                 str(root / "decoder.pkl"), "--out", str(dvae), "--trust-pickle", "--image-size", str(SIDE)]) == 0

    run = root / "run"
    tiny = [f"data.source=wds:{shards}/{{00000..00001}}.tar", f"data.size={SIDE}", f"dvae.pretrained={dvae}",
            "tokenizer.vocab_size=300",
            "clip={embed_dim: 16, text_dim: 16, text_depth: 1, text_heads: 2, vision_dim: 16, vision_depth: 1, "
            "vision_heads: 2, patch_size: 16}",
            "transformer.dim=16", "transformer.depth=4", "transformer.heads=2", "transformer.conv_kernel=3"]
    for stage, steps in (("clip", 2), ("transformer", 3)):
        tiny += [f"train.{stage}.steps={steps}", f"train.{stage}.batch_size=8", f"train.{stage}.grad_accum=1",
                 f"train.{stage}.warmup_steps=1", f"train.{stage}.num_workers=2", f"train.{stage}.sample_every=0"]
    assert main(["--quiet", "train-all", "--config", str(COCO), "--run-dir", str(run),
                 *[item for override in tiny for item in ("--set", override)]]) == 0
    return run, test, shards


def test_train_all_on_shards_with_the_converted_dvae(photo_run):
    run, _, shards = photo_run
    source = open_source(f"wds:{shards}/{{00000..00001}}.tar", DataConfig(size=SIDE))
    pairs = list(source)  # the .json members and 00000_stats.json are not samples
    assert len(pairs) == 32 and not source.skipped and {image.size for image, _ in pairs} == {(SIDE, SIDE)}
    for stage in ("dvae", "clip", "transformer"):
        assert (run / stage / "config.json").is_file() and (run / stage / "model.safetensors").is_file()
    assert (run / "tokenizer.json").is_file() and not (run / "train-state" / "dvae").exists()  # converted, not trained
    transformer = json.loads((run / "transformer" / "config.json").read_text())["config"]
    assert (transformer["image_grid"], transformer["image_vocab"], transformer["attention"]) == (8, 512, ["paper"])
    assert json.loads((run / "sampling.json").read_text())["cond_scale"] == 3.0  # the config's sampling section
    logs = [json.loads(line) for line in (run / "logs" / "transformer.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in logs)
    assert all(np.isfinite(record["loss"]) for record in logs if "loss" in record)


def test_generate_and_eval_on_the_photo_run(photo_run, tmp_path, capsys):
    run, test, _ = photo_run
    out = tmp_path / "generated"
    assert main(["--quiet", "generate", "--model", str(run), "--prompt", "a red ball high in a blue and green sky",
                 "--candidates", "3", "--keep", "2", "--seed", "0", "--out", str(out), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["rank"] for line in lines] == [1, 2] and lines[0]["clip_score"] >= lines[1]["clip_score"]
    for line in lines:
        with Image.open(out / line["image"]) as image:
            assert image.size == (SIDE, SIDE) and image.mode == "RGB"

    evaluation = tmp_path / "eval"
    capsys.readouterr()
    assert main(["--quiet", "eval", "--model", str(run), "--data", f"folder:{test}", "--out", str(evaluation),
                 "--candidates", "2", "--device", "cpu"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["captions"] == 8 and metrics["gallery"] == 8 and metrics["skipped"] == "8 read, 0 skipped"
    assert {"n", "retrieval_top1", "retrieval_top5", "median_rank", "clip_score", "clip_score_real",
            "frechet_clip"} <= set(metrics["all"])
    assert 0.0 <= metrics["all"]["retrieval_top1"] <= 1.0 and metrics["all"]["n"] == 8
    assert {"reconstruction_psnr", "real_shifted_1px_top1", "real_random_caption_top1"} <= set(metrics["calibration"])
    assert (evaluation / "report.html").is_file()
