"""Device and precision, editing any region, pictures that stream in, and the Hub conventions."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.cli import main
from dalle.errors import DalleError
from dalle.inference.devices import cpu_prefers_bf16, resolve_device, resolve_dtype
from dalle.inference.editing import region_to_codes
from dalle.inference.hub import read_card_metadata
from dalle.inference.pipeline import load_pipeline


def codes_of(pipeline, image: Image.Image) -> torch.Tensor:
    return pipeline.encode_image(image)[0]  # (N,)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_and_bfloat16_pipelines_draw_pictures(tiny_pipeline, dtype):
    pipeline = load_pipeline(tiny_pipeline, device="cpu", dtype=dtype)
    assert pipeline.transformer.text_emb.weight.dtype == getattr(torch, dtype)
    assert {p.dtype for p in pipeline.dvae.parameters()} == {torch.float32}  # the dVAE stays in float32
    (samples,) = pipeline(["a red circle"], candidates=3, keep=2, seed=1)
    assert [s.image.size for s in samples] == [(32, 32)] * 2
    assert all(s.clip_score == s.clip_score for s in samples)  # finite, not NaN


def test_the_same_seed_gives_the_same_tokens_in_float32(tiny_pipeline):
    runs = [load_pipeline(tiny_pipeline, device="cpu", dtype="float32")(["a blue square"], candidates=4, keep=4,
                                                                          seed=9)[0] for _ in range(2)]
    assert [s.image.tobytes() for s in runs[0]] == [s.image.tobytes() for s in runs[1]]


def test_devices_and_dtypes_that_cannot_run_are_one_line_errors():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_prefers_bf16() else torch.float32)
    with pytest.raises(DalleError, match="float16 cannot run on the cpu"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(DalleError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DalleError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_generate_on_the_cpu_in_bfloat16_and_compiled(tiny_pipeline, tmp_path):
    for name, flags in (("bf16", ["--dtype", "bfloat16"]), ("compiled", ["--compile"])):
        out = tmp_path / name
        assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a red circle", "--candidates", "2",
                     "--keep", "2", "--seed", "0", "--out", str(out), "--device", "cpu", *flags]) == 0
        lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert [line["rank"] for line in lines] == [1, 2]
        assert all(Image.open(out / line["image"]).size == (32, 32) for line in lines)
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a", "--out", str(tmp_path / "x"),
                 "--dtype", "float16", "--device", "cpu"]) == 2


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("every_rows", [1, 3])
def test_the_stream_ends_with_the_pictures_of_a_plain_call(tiny_pipeline, every_rows):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    frames = list(pipeline.stream("a green triangle", candidates=3, keep=2, seed=5, every_rows=every_rows))
    grid = pipeline.grid
    assert len(frames) == -(-grid // every_rows)  # one frame per every_rows rows, the last row included
    assert [f.rows for f in frames][-1] == grid and all(f.samples is None for f in frames[:-1])
    (plain,) = pipeline(["a green triangle"], candidates=3, keep=2, seed=5)
    assert [s.image.tobytes() for s in frames[-1].samples] == [s.image.tobytes() for s in plain]
    assert frames[-1].images[plain[0].candidate].tobytes() == plain[0].image.tobytes()
    first = frames[0].images[0]  # rows not sampled yet are blank
    assert first.getpixel((0, 31)) == (255, 255, 255) or every_rows >= grid


def test_generate_frames_writes_an_animation_per_kept_picture(tiny_pipeline, tmp_path):
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a red circle", "--candidates", "2",
                 "--keep", "2", "--out", str(tmp_path), "--frames", "--every-rows", "4", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for line in lines:
        gif = Image.open(tmp_path / line["frames"])
        assert gif.n_frames == 2  # 4 rows, then all 8: the finished picture
        gif.seek(gif.n_frames - 1)
        final = Image.open(tmp_path / line["image"]).convert("RGB").resize(gif.size, Image.Resampling.NEAREST)
        # A GIF frame has at most 256 colours: equal up to the palette's rounding.
        difference = np.abs(np.asarray(gif.convert("RGB"), dtype=int) - np.asarray(final, dtype=int))
        assert difference.max() <= 24 and difference.mean() < 2


# ----------------------------------------------------------------------------- editing


def picture(tiny_pipeline) -> Image.Image:
    from dalle.data.shapes import render

    return render("test", 0, 3, 32)[0]


def test_an_edit_keeps_the_codes_outside_the_box(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    image = picture(tiny_pipeline)
    box = (16, 0, 32, 16)  # the top right quadrant
    redraw = region_to_codes(box, image.size, 32, pipeline.grid)
    assert redraw.sum() == (pipeline.grid // 2) ** 2
    before = codes_of(pipeline, image)
    samples = pipeline.edit(image, box, "a red circle in the top right", candidates=4, keep=4, seed=0)
    assert all(sample.image.size == (32, 32) for sample in samples)
    assert all(torch.equal(sample.codes[~redraw], before[~redraw]) for sample in samples)
    assert any(not torch.equal(sample.codes[redraw], before[redraw]) for sample in samples)


def test_bad_regions_are_one_line_errors(tiny_pipeline, tmp_path):
    size, grid = (32, 32), 8
    with pytest.raises(DalleError, match="is empty"):
        region_to_codes((5, 5, 5, 9), size, 32, grid)
    with pytest.raises(DalleError, match="whole picture"):
        region_to_codes((0, 0, 32, 32), size, 32, grid)
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    with pytest.raises(DalleError, match="same size"):
        region_to_codes(tmp_path / "small.png", size, 32, grid)
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(DalleError, match="cannot read the mask"):
        region_to_codes(tmp_path / "text.png", size, 32, grid)
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 24, 32, 32))  # outpainting: the bottom border
    assert region_to_codes(mask, size, 32, grid).view(grid, grid)[6:].all()


def test_dalle_edit_writes_the_contract_files(tiny_pipeline, tmp_path, capsys):
    picture(tiny_pipeline).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert main(["edit", "--model", str(tiny_pipeline), "--image", str(tmp_path / "in.png"), "--box", "0,0,16,16",
                 "--prompt", "a blue square in the top left", "--candidates", "3", "--keep", "2", "--seed", "1",
                 "--out", str(out), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["rank"] for line in lines] == [1, 2] and lines[0]["mask"] == "0,0,16,16"
    assert all((out / line["image"]).is_file() for line in lines)
    capsys.readouterr()
    for bad in (["--box", "0,0,32,32"], ["--box", "1,2,3"], ["--mask", str(tmp_path / "none.png")]):
        assert main(["edit", "--model", str(tiny_pipeline), "--image", str(tmp_path / "in.png"), *bad,
                     "--prompt", "a", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("dalle: error:") for line in err)


# ----------------------------------------------------------------------------- the Hub


def test_save_pretrained_round_trip_with_shards_and_a_card(tiny_pipeline, tmp_path):
    pipeline = load_pipeline(tiny_pipeline, device="cpu")
    saved = pipeline.save_pretrained(tmp_path / "saved", max_shard_size=20_000,
                                     metrics={"one_object": {"top1_colour_shape": 0.5}})
    assert list((saved / "transformer").glob("model-0000*-of-0000*.safetensors"))
    assert (saved / "transformer" / "model.safetensors.index.json").is_file()
    card = read_card_metadata(saved)
    assert card["library_name"] == "dalle" and card["pipeline_tag"] == "text-to-image" and "dalle" in card["tags"]
    assert "top1_colour_shape" in (saved / "README.md").read_text()
    again = load_pipeline(saved, device="cpu")
    a = pipeline(["a red circle"], candidates=3, keep=3, seed=2)[0]
    b = again(["a red circle"], candidates=3, keep=3, seed=2)[0]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]


def test_hf_loading_reads_a_local_snapshot(tiny_pipeline, tmp_path, monkeypatch):
    """`hf:USER/REPO` through huggingface_hub's cache layout, offline."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-dalle" / "snapshots" / "0123456789abcdef"
    load_pipeline(tiny_pipeline, device="cpu").save_pretrained(snapshot)
    (cache / "models--someone--tiny-dalle" / "refs").mkdir()
    (cache / "models--someone--tiny-dalle" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pipeline = load_pipeline("hf:someone/tiny-dalle", device="cpu")
    assert pipeline.directory == snapshot
    with pytest.raises(DalleError, match="not in the local Hugging Face cache"):
        load_pipeline("hf:someone/missing", device="cpu")
    with pytest.raises(DalleError, match="hf:USER/REPO"):
        load_pipeline("hf:no-slash", device="cpu")


def test_push_to_hub_uploads_the_saved_folder(tiny_pipeline, monkeypatch):
    uploaded = {}

    class FakeApi:  # stands in for huggingface_hub.HfApi: nothing reaches a network
        def __init__(self, token=None):
            pass

        def create_repo(self, repo, private=False, exist_ok=False):
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = sorted(os.listdir(folder_path))
            uploaded["card"] = read_card_metadata(folder_path)
            shutil.copytree(folder_path, os.path.join(str(tiny_pipeline.parent), "pushed"), dirs_exist_ok=True)

    monkeypatch.setattr("dalle.inference.hub.HfApi", FakeApi)
    url = load_pipeline(tiny_pipeline, device="cpu").push_to_hub("someone/tiny-dalle")
    assert url == "https://huggingface.co/someone/tiny-dalle"
    assert {"README.md", "tokenizer.json", "sampling.json", "transformer", "dvae", "clip"} <= set(uploaded["files"])
    assert uploaded["card"]["pipeline_tag"] == "text-to-image"
