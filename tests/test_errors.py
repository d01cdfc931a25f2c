"""Bad input gets one line and exit 2; nothing is lost when two runs or a kill collide."""

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle.checkpoint import CheckpointError, atomic_directory, read_model_meta
from dalle.cli import main

from .conftest import TINY

ROOT = Path(__file__).parent.parent


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: a signature, an IHDR chunk and IEND, no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def write_bad_files(tmp: Path, model: Path) -> dict[str, str]:
    """The files the probes point at: a non-UTF-8 YAML, a garbage PNG, broken model copies..."""
    (tmp / "afile").write_text("x")
    (tmp / "adir").mkdir()
    (tmp / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    (tmp / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    (tmp / "huge.png").write_bytes(png_header(20_000, 20_000))
    listed = tmp / "listed"
    subprocess.run(["cp", "-r", str(model), str(listed)], check=True)
    (listed / "transformer" / "config.json").write_text("[1, 2]")
    nan = tmp / "nan"
    subprocess.run(["cp", "-r", str(model), str(nan)], check=True)
    weights = load_file(str(nan / "dvae" / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(nan / "dvae" / "model.safetensors"))
    future = tmp / "future"
    subprocess.run(["cp", "-r", str(model), str(future)], check=True)
    meta = json.loads((future / "clip" / "config.json").read_text())
    (future / "clip" / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    wide = tmp / "wide"
    subprocess.run(["cp", "-r", str(model), str(wide)], check=True)
    meta = json.loads((wide / "transformer" / "config.json").read_text())
    meta["config"]["dim"] = 2**40
    (wide / "transformer" / "config.json").write_text(json.dumps(meta))
    ints = tmp / "ints"
    subprocess.run(["cp", "-r", str(model), str(ints)], check=True)
    weights = load_file(str(ints / "dvae" / "model.safetensors"))
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in weights.items()},
              str(ints / "dvae" / "model.safetensors"))
    blank = tmp / "blank-captions"
    blank.mkdir()
    (blank / "0.png").write_bytes((ROOT / "docs" / "attention_masks.png").read_bytes())
    (blank / "0.txt").write_text("\n")
    images = tmp / "images"
    images.mkdir()
    (images / "a.png").write_bytes((ROOT / "docs" / "attention_masks.png").read_bytes())
    (images / ".dalle-index").symlink_to(tmp / "adir")
    return {"tmp": str(tmp), "model": str(model), "listed": str(listed), "nan": str(nan), "images": str(images),
            "future": str(future), "wide": str(wide), "ints": str(ints), "blank": str(blank)}


GEN = ["generate", "--model", "{model}", "--prompt", "a red circle", "--out", "{tmp}/out"]
TRAIN = ["train-vae", "--config", str(TINY), "--run-dir", "{tmp}/run"]
PROBES = {
    "out is a file": ["generate", "--model", "{model}", "--prompt", "a", "--out", "{tmp}/afile"],
    "temperature nan": [*GEN, "--temperature", "nan"],
    "cond-scale inf": [*GEN, "--cond-scale", "inf"],
    "cond-scale nan": [*GEN, "--cond-scale", "nan"],
    "cond-scale negative": [*GEN, "--cond-scale", "-5"],
    "top-p zero": [*GEN, "--top-p", "0"],
    "a billion candidates": [*GEN, "--candidates", "1000000000"],
    "seed past 64 bits": [*GEN, "--seed", "18446744073709551616"],
    "negative batch size": [*GEN, "--batch-size", "-1"],
    "prompts file is a folder": ["generate", "--model", "{model}", "--prompts-file", "{tmp}/adir", "--out", "{tmp}/o"],
    "garbage prime image": [*GEN, "--prime-image", "{tmp}/garbage.png", "--prime-rows", "2"],
    "a 20000x20000 prime image": [*GEN, "--prime-image", "{tmp}/huge.png", "--prime-rows", "2"],
    "a 20000x20000 picture to edit": ["edit", "--model", "{model}", "--image", "{tmp}/huge.png", "--box", "0,0,8,8",
                                      "--prompt", "a", "--out", "{tmp}/e"],
    "config.json is a list": ["generate", "--model", "{listed}", "--prompt", "a", "--out", "{tmp}/o"],
    "NaN weights": ["generate", "--model", "{nan}", "--prompt", "a", "--out", "{tmp}/o"],
    "heads 0": [*TRAIN, "--set", "transformer.heads=0"],
    "patch size 0": [*TRAIN, "--set", "clip.patch_size=0"],
    "dvae hidden 3": [*TRAIN, "--set", "dvae.hidden=3"],
    "log_every 0": [*TRAIN, "--set", "train.dvae.log_every=0"],
    "broken --set value": [*TRAIN, "--set", "train.dvae.lr=[1,"],
    "infinite lr": [*TRAIN, "--set", "train.dvae.lr=.inf"],
    "NaN lr": [*TRAIN, "--set", "train.dvae.lr=.nan"],
    "non-UTF-8 YAML": ["train-vae", "--config", "{tmp}/latin1.yaml"],
    "negative vocabulary": ["train-tokenizer", "--out", "{tmp}/t.json", "--vocab-size", "-5"],
    "zero columns": ["data", "show", "--out", "{tmp}/s.png", "--columns", "0"],
    "search index through a symlink": ["search", "--model", "{model}", "--images", "{images}", "--query", "a"],
    "classify without labels": ["classify", "--model", "{model}", "--labels", "{images}/a.png"],
    "eval of unknown data": ["eval", "--model", "{model}", "--out", "{tmp}/e", "--data", "emoji"],
    "not a number": [*GEN, "--candidates", "many"],
    "unknown flag": [*GEN, "--colour", "red"],
    # found by probing every subcommand (issue #22)
    "threads past a C int": ["--threads", "99999999999", "data", "export", "--n", "1", "--out", "{tmp}/d"],
    "a 100000-pixel picture size": ["data", "export", "--n", "1", "--size", "100000", "--out", "{tmp}/d"],
    "shapes of 16 pixels": [*TRAIN, "--set", "data.size=16", "--set", "dvae.image_size=16"],
    "negative data seed": ["data", "export", "--n", "1", "--seed", "-1", "--out", "{tmp}/d"],
    "negative training seed": [*TRAIN, "--set", "train.dvae.seed=-1"],
    "2**40 pairs in memory": [*TRAIN, "--set", "data.n=1099511627776"],
    "an empty --out": ["data", "export", "--n", "0", "--out", ""],
    "an empty run_dir": ["train-vae", "--config", str(TINY), "--set", "run_dir=''"],
    "shapes with an argument": ["data", "export", "--n", "1", "--data", "shapes:3", "--out", "{tmp}/d"],
    "only blank captions": ["data", "export", "--n", "1", "--data", "folder:{blank}", "--out", "{tmp}/d"],
    "tokenizer --out is a folder": ["train-tokenizer", "--out", "{tmp}/adir", "--n", "20", "--vocab-size", "300"],
    "layers 2**40 wide": ["generate", "--model", "{wide}", "--prompt", "a", "--out", "{tmp}/o"],
    "a format_version from the future": ["generate", "--model", "{future}", "--prompt", "a", "--out", "{tmp}/o"],
    "integer weights": ["generate", "--model", "{ints}", "--prompt", "a", "--out", "{tmp}/o"],
    "prime rows without a picture": [*GEN, "--prime-rows", "3"],
    "every-rows 0": [*GEN, "--every-rows", "0"],
    "every-rows without frames": [*GEN, "--every-rows", "4"],
    "export of no pair": ["data", "export", "--n", "0", "--out", "{tmp}/export0"],
    "a box of superscript digits": ["edit", "--model", "{model}", "--image", "{images}/a.png", "--box", "\u00b2,0,8,8",
                                    "--prompt", "a", "--out", "{tmp}/e"],
    "classify an unreadable picture": ["classify", "--model", "{model}", "--labels", "a", "{tmp}/garbage.png"],
    "serve on an empty host": ["serve", "--model", "{model}", "--host", "", "--port", "7861"],
    "serve on a host that is not text": ["serve", "--model", "{model}", "--host", "\udcff", "--port", "7861"],
    "eval of folder: without a folder": ["eval", "--model", "{model}", "--out", "{tmp}/e", "--data", "folder:"],
    "demo with no candidates": ["demo", "--out", "{tmp}/demo", "--candidates", "0"],
}


@pytest.fixture(scope="module")
def bad_files(tiny_pipeline, tmp_path_factory):
    return write_bad_files(tmp_path_factory.mktemp("bad"), tiny_pipeline)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_bad_input_gets_one_line_and_exit_2(name, bad_files, capsys):
    argv = [part.format(**bad_files) for part in PROBES[name]]
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dalle: error:"), err


def test_nothing_is_written_when_the_arguments_are_wrong(tiny_pipeline, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a", "--candidates", "2",
                 "--out", str(out)]) == 0
    before = (out / "samples.jsonl").read_bytes()
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "b", "--temperature", "nan",
                 "--out", str(out)]) == 2
    assert (out / "samples.jsonl").read_bytes() == before


def test_a_picture_name_without_suffix_is_written_as_png(tiny_pipeline, tmp_path):
    picture = tmp_path / "pic.png"
    assert main(["data", "export", "--n", "1", "--out", str(tmp_path / "d")]) == 0
    assert main(["reconstruct", "--model", str(tiny_pipeline), "--out", str(tmp_path / "recon"),
                 str(tmp_path / "d" / "00000.png")]) == 0
    assert (tmp_path / "recon").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not picture.exists()


def test_resume_with_another_model_size_is_one_line(tmp_path, capsys):
    run = ["train-vae", "--config", str(TINY), "--run-dir", str(tmp_path), "--set", "train.dvae.steps=2"]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--set", "dvae.hidden=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dalle: error: {tmp_path / 'train-state' / 'dvae'} was trained with dvae.hidden = 8, now 16: "
                   "use another --run-dir, or --resume none to start over"], err
    state = sorted((tmp_path / "train-state" / "dvae").glob("step-*"))[-1]
    (state / "model.safetensors").write_bytes(b"")  # a zero-byte weights file
    assert main([*run, "--set", "train.dvae.steps=4"]) == 2
    assert "damaged or of another model" in capsys.readouterr().err


def test_a_second_generate_into_the_same_out_is_refused(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    slow = [sys.executable, "-m", "dalle", "generate", "--model", str(tiny_pipeline), "--candidates", "8",
            "--prompt", *[f"a red circle {i}" for i in range(40)], "--out", str(out)]
    first = subprocess.Popen(slow, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    for _ in range(600):  # until the first holds the lock (it has written its first picture)
        if out.is_dir() and any(out.glob("*.png")):
            break
        time.sleep(0.05)
    second = main(["generate", "--model", str(tiny_pipeline), "--prompt", "a blue square", "--out", str(out)])
    stdout, stderr = first.communicate(timeout=300)
    assert second == 2 and capsys.readouterr().err.strip() == f"dalle: error: {out} is in use by process {first.pid}"
    assert first.returncode == 0, stderr
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [f"a red circle {i}" for i in range(40)]
    assert all((out / line["image"]).is_file() for line in lines)


KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from dalle.checkpoint import atomic_directory
calls = []
real = os.replace
def replace(a, b):
    calls.append(a)
    if len(calls) == 2:  # the old copy is moved aside, the new one not yet in place
        os._exit(9)
    return real(a, b)
os.replace = replace
with atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "config.json").write_text('{"kind": "new"}')
"""


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path):
    model = tmp_path / "transformer"
    with atomic_directory(model) as tmp:
        (tmp / "config.json").write_text('{"kind": "old"}')
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(model)], cwd=ROOT)
    assert killed.returncode == 9 and not model.exists()
    assert any(p.name.startswith(".transformer.old-") for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="holds a 'old' model"):  # the next open restores the old copy
        read_model_meta(model, "transformer")
    assert json.loads((model / "config.json").read_text()) == {"kind": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]  # the dead run's copies are cleaned


def test_an_index_of_nan_or_misshapen_embeddings_is_rebuilt(tiny_pipeline, tmp_path, capsys):
    images = tmp_path / "images"
    assert main(["data", "export", "--n", "3", "--out", str(images)]) == 0
    search = ["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle"]
    assert main(search) == 0
    embeddings = images / ".dalle-index" / "embeddings.safetensors"
    for broken in (torch.full((3, 16), float("nan")), torch.zeros(3, 999)):
        save_file({"embeddings": broken}, str(embeddings))
        capsys.readouterr()
        assert main(search) == 0
        hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(hits) == 3 and all(hit["score"] == hit["score"] for hit in hits), hits  # no NaN


def test_a_label_too_long_to_be_a_file_name_is_a_label(tiny_pipeline, tmp_path, capsys):
    picture = ROOT / "docs" / "attention_masks.png"
    assert main(["classify", "--model", str(tiny_pipeline), "--labels", "x" * 5000, str(picture)]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "x" * 5000


def test_odd_text_and_a_corrupt_index_still_give_results(tiny_pipeline, tmp_path, capsys):
    """Bytes that are not UTF-8 on the command line (lone surrogates) and a damaged search index."""
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "caf\udce9 circle", "--candidates", "1",
                 "--out", str(tmp_path / "g")]) == 0
    images = tmp_path / "images"
    assert main(["data", "export", "--n", "3", "--out", str(images)]) == 0
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "caf\udce9"]) == 0
    (images / ".dalle-index" / "embeddings.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["classify", "--model", str(tiny_pipeline), "--labels", "caf\udce9", "a red circle",
                 str(images / "00000.png")]) == 0


def test_search_never_writes_through_a_planted_symlink(tiny_pipeline, tmp_path):
    images = tmp_path / "images"
    assert main(["data", "export", "--n", "3", "--out", str(images)]) == 0
    (images / ".dalle-index").mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (images / ".dalle-index" / "last-search.png").symlink_to(victim)
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle"]) == 0
    assert victim.read_text() == "precious"
    strip = images / ".dalle-index" / "last-search.png"
    assert not strip.is_symlink() and strip.read_bytes()[:4] == b"\x89PNG"
    elsewhere = tmp_path / "index"
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle",
                 "--index-dir", str(elsewhere)]) == 0
    assert (elsewhere / "embeddings.safetensors").is_file() and (elsewhere / "last-search.png").is_file()
