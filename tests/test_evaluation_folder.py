"""`dalle eval --data folder:DIR`: real pictures, odd files, held-out kinds, and the measures themselves."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.cli import main
from dalle.data import shapes
from dalle.evaluation.folder import frechet_distance, retrieval_ranks


def write_pairs(folder, start, count):
    folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for index in range(start, start + count):
        image, caption = shapes.render("test", 0, index, 32)
        image.save(folder / f"p{index}.png")
        (folder / f"p{index}.txt").write_text(caption)
        stems.append(f"p{index}")
    return stems


def test_eval_on_a_folder_of_real_pictures(tiny_pipeline, tmp_path, capsys):
    data = tmp_path / "data"
    test_stems = write_pairs(data / "test", 0, 6)
    write_pairs(data / "train", 100, 10)
    odd = data / "test"
    Image.new("L", (40, 30), 128).save(odd / "grey.png")  # converted
    Image.new("RGBA", (32, 32), (255, 0, 0, 100)).save(odd / "rgba.png")
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(odd / "sixteen.png")
    Image.new("P", (32, 32), 3).save(odd / "palette.png")
    (odd / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    for stem in ("grey", "rgba", "sixteen", "palette", "garbage"):
        (odd / f"{stem}.txt").write_text(f"an odd {stem} picture")
    split = {"held_out": {"style": test_stems[:3], "tone": test_stems[3:]}}
    (data / "split.json").write_text(json.dumps(split))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_pipeline), "--data", f"folder:{data / 'test'}", "--out", str(out),
                 "--candidates", "2", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == "10 read, 1 skipped (1 broken image)"  # 6 pairs and 4 odd pictures converted
    assert metrics["gallery"] == 20 and metrics["captions"] == 10
    assert {"style", "tone", "other", "all", "calibration"} <= set(metrics)
    assert metrics["style"]["n"] == 3 and metrics["tone"]["n"] == 3 and metrics["all"]["n"] == 10
    for key in ("retrieval_top1", "retrieval_top5", "clip_score", "frechet_clip"):
        assert isinstance(metrics["all"][key], float)
    calibration = metrics["calibration"]
    assert calibration["real_shifted_1px_top1"] >= 0.8 and calibration["real_random_caption_top1"] <= 0.5
    assert (out / "report.html").is_file() and (out / "worst.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_pipeline), "--data", f"folder:{tmp_path / 'none'}", "--out",
                 str(out)]) == 2
    assert capsys.readouterr().err.startswith("dalle: error:")


def test_retrieval_and_frechet_measure_what_they_say():
    gallery_images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from dalle.evaluation.folder import features

    gallery = features(gallery_images)
    assert retrieval_ranks(gallery_images, gallery, [{i} for i in range(5)]) == [1] * 5
    assert retrieval_ranks(gallery_images[[1]], gallery, [{0}])[0] > 1
    a = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 3.0) == pytest.approx(8 * 9.0, rel=1e-6)  # only the means differ
