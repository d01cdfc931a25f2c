import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle.data import shapes
from dalle.tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ROOT / "tokenizers" / "shapes.json", text_len=16)


def test_every_shapes_word_round_trips(tokenizer):
    words = [*shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES, *shapes.POSITIONS, *shapes.RELATIONS, "a", "an", "in the"]
    for word in words:
        assert tokenizer.decode(tokenizer.encode(word)) == [word]
    for index in range(200):
        caption = shapes.render("test", 0, index, 32)[1]
        assert tokenizer.decode(tokenizer.encode(caption)) == [caption]


def test_block_has_per_position_padding(tokenizer):
    block = tokenizer.encode(["a red circle", ""])
    assert block.shape == (2, 16) and block.dtype == torch.long
    assert torch.equal(block[1], tokenizer.pad_ids())
    assert block[1].unique().numel() == 16  # one distinct padding id per position
    assert int(block.max()) < tokenizer.total_vocab
    real = block[0] < tokenizer.vocab_size
    assert torch.equal(block[0][~real], tokenizer.pad_ids()[~real])


def test_normalisation_and_odd_input(tokenizer):
    assert tokenizer.decode(tokenizer.encode("  A RED\tCircle ")) == ["a red circle"]
    for text in ["😀" * 50, "\x00\x07 red", "x" * 10_000]:
        block = tokenizer.encode(text)
        assert block.shape == (1, 16)


def test_long_caption_is_cut_with_a_warning(tokenizer):
    tokenizer._warned = False
    with pytest.warns(UserWarning, match="cut to 16 tokens"):
        tokenizer.encode("a red circle " * 20)


def test_bpe_dropout_changes_segmentation_only_when_asked():
    plain = load_tokenizer(ROOT / "tokenizers" / "shapes.json", 64)
    dropped = load_tokenizer(ROOT / "tokenizers" / "shapes.json", 64, bpe_dropout=0.5)
    text = "a purple triangle to the left of an orange circle"
    assert all(torch.equal(plain.encode(text), plain.encode(text)) for _ in range(5))
    assert any(not torch.equal(plain.encode(text), dropped.encode(text)) for _ in range(20))
    assert dropped.decode(dropped.encode(text)) == [text]


def test_shipped_digits_tokenizer():
    digits = load_tokenizer(ROOT / "tokenizers" / "digits.json", 8)
    assert digits.decode(digits.encode("a handwritten seven")) == ["a handwritten seven"]


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "nope.json", 8)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizers file"):
        load_tokenizer(bad, 8)


def test_import_tokenizers_finds_the_library_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import tokenizers; print(tokenizers.Tokenizer.__module__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "tokenizers" in out
