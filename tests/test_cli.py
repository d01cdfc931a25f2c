from pathlib import Path

import pytest

from dalle.cli import main
from dalle.data import shapes


def test_data_export_writes_the_contract_folder(tmp_path):
    out = tmp_path / "x"
    assert main(["data", "export", "--data", "shapes", "--split", "test", "--n", "12", "--size", "32",
                 "--seed", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir())[:2] == ["00000.png", "00000.txt"]
    assert len(list(out.glob("*.png"))) == 12
    image, caption = shapes.render("test", 0, 5, 32)
    assert (out / "00005.txt").read_text().strip() == caption
    assert (out / "00005.png").read_bytes()  # and the folder reads back:
    assert main(["data", "show", "--data", f"folder:{out}", "--n", "12", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "show", "--data", f"folder:{tmp_path}/none", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dalle: error:") and err.count("\n") == 1


def test_train_tokenizer(tmp_path):
    out = tmp_path / "tok.json"
    assert main(["train-tokenizer", "--data", "shapes", "--n", "500", "--out", str(out)]) == 0
    assert Path(out).stat().st_size > 100


def read_jsonl(path):
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_generate_follows_the_contract(tiny_pipeline, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a small blue square in the top left\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_pipeline), "--prompts-file", str(prompts), "--candidates", "3",
                 "--keep", "2", "--seed", "5", "--out", str(out)]) == 0
    lines = read_jsonl(out / "samples.jsonl")
    assert [(line["prompt"], line["rank"]) for line in lines] == [
        ("a red circle", 1), ("a red circle", 2),
        ("a small blue square in the top left", 1), ("a small blue square in the top left", 2)]
    assert all((out / line["image"]).is_file() and isinstance(line["clip_score"], float) for line in lines)
    assert lines[0]["clip_score"] >= lines[1]["clip_score"] and lines[0]["seed"] == 5
    none = tmp_path / "none"
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a red circle", "--candidates", "3",
                 "--keep", "3", "--rerank", "none", "--out", str(none)]) == 0
    assert [line["rank"] for line in read_jsonl(none / "samples.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("prompt", ["", "x" * 1_000, "😀🎨🖼️" * 30, "a red\x00\x07 circle\n\t"])
def test_odd_prompts_give_a_sample_not_a_traceback(tiny_pipeline, tmp_path, prompt):
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", prompt, "--candidates", "1",
                 "--out", str(tmp_path)]) == 0
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 1


def test_generate_errors_are_one_line(tiny_pipeline, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert main(["generate", "--model", str(tiny_pipeline), "--prompts-file", str(tmp_path / "no.txt"),
                 "--out", str(tmp_path)]) == 2
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "a", "--candidates", "2", "--keep", "3",
                 "--out", str(tmp_path)]) == 2
    assert main(["generate", "--model", str(tiny_pipeline), "--prompt", "x" * 1_001, "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("dalle: error:") for line in lines)
    assert "at most 1000 characters" in lines[-1]


def test_classify_and_search_follow_the_contract(tiny_pipeline, tmp_path, capsys):
    import json

    images = tmp_path / "images"
    main(["data", "export", "--data", "shapes", "--split", "test", "--n", "6", "--out", str(images)])
    (images / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    files = [str(images / f"0000{i}.png") for i in range(3)]
    assert main(["classify", "--model", str(tiny_pipeline), "--labels", "a red circle", "a blue square", *files,
                 str(tmp_path / "missing.png"), str(images / "broken.png")]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["image"] for line in lines] == files
    assert all(set(line["probs"]) == {"a red circle", "a blue square"} and
               abs(sum(line["probs"].values()) - 1) < 1e-4 for line in lines)
    assert "skipped 2" in captured.err
    assert main(["classify", "--model", str(tiny_pipeline), "--labels", *files]) == 2  # no labels

    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle",
                 "--k", "3"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    index = images / ".dalle-index" / "embeddings.safetensors"
    stamp = index.stat().st_mtime_ns
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle"]) == 0
    assert index.stat().st_mtime_ns == stamp  # unchanged pictures: the index is reused
    main(["data", "export", "--data", "shapes", "--split", "train", "--n", "7", "--out", str(images)])
    capsys.readouterr()
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", "a red circle",
                 "--k", "50"]) == 0
    assert index.stat().st_mtime_ns != stamp
    assert len(capsys.readouterr().out.splitlines()) == 7  # 7 pictures now (00006 added), broken.png skipped
    assert main(["search", "--model", str(tiny_pipeline), "--images", str(images), "--query", " "]) == 2


def test_demo_trains_reuses_and_ends_with_the_grid_path(tmp_path, capsys):
    out = tmp_path / "demo"
    tiny = str(Path(__file__).parent / "tiny.yaml")
    fast = ["--candidates", "2", "--eval-prompts", "1"]
    assert main(["demo", "--out", str(out), "--config", tiny, *fast]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out / "grid.png") and (out / "grid.png").stat().st_size > 1000
    assert (out / "report.html").is_file() and (out / "model" / "transformer" / "model.safetensors").is_file()
    assert main(["demo", "--out", str(out), "--config", tiny, *fast]) == 0
    assert "already trained" in capsys.readouterr().err


def test_python_dash_m_dalle_is_the_same_command():
    import subprocess
    import sys

    from dalle import __version__

    out = subprocess.run([sys.executable, "-m", "dalle", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"dalle {__version__}"
    out = subprocess.run([sys.executable, "-m", "dalle", "generate", "--model", "nowhere", "--prompt", "x",
                          "--out", "o"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("dalle: error:")
