from pathlib import Path

from dalle import shapes
from dalle.cli import main


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
