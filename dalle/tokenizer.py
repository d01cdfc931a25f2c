"""The caption tokenizer: a byte-level BPE (Hugging Face `tokenizers`) and the paper's text block.

A caption becomes exactly `text_len` ids. BPE ids lie in [0, vocab_size); the position
i of the block that the caption does not fill holds its own padding id vocab_size + i,
as in the DALL-E paper, so the model always knows where it is in the text. An empty
caption is all padding: it means "no caption" (and is the unconditional input of
classifier-free guidance). Captions longer than the block are cut, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dalle.errors import DalleError

TOKENIZER_FILE = "tokenizer.json"  # its name in a run (pipeline) directory


class TokenizerError(DalleError):
    """A tokenizer file that is missing or unreadable."""


def normalizer() -> normalizers.Normalizer:
    """NFKC, lower case, control characters to spaces, spaces collapsed, trimmed."""
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[\p{Cc}\p{Cf}]"), " "),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def train_bpe(captions: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Trains a byte-level BPE on captions (any iterable of strings)."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.normalizer = normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    return tokenizer


class Tokenizer:
    """Turns captions into (B, text_len) id blocks and back."""

    def __init__(self, hf_tokenizer: HFTokenizer, text_len: int, bpe_dropout: float = 0.0):
        self.hf = hf_tokenizer
        self.text_len = text_len
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.hf.model.dropout = bpe_dropout if bpe_dropout > 0 else None
        self._warned = False

    @property
    def total_vocab(self) -> int:
        """BPE ids plus one padding id per text position: the text embedding's size."""
        return self.vocab_size + self.text_len

    def pad_ids(self) -> torch.Tensor:
        """The all-padding block, i.e. the empty caption: (text_len,)."""
        return torch.arange(self.text_len) + self.vocab_size

    def encode(self, texts: list[str] | str) -> torch.Tensor:
        """Captions -> (B, text_len) int64 ids; long captions are cut with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        block = self.pad_ids().repeat(len(texts), 1)  # (B, T)
        # Lone surrogates (bytes that were not UTF-8 on the command line) become U+FFFD.
        texts = [str(t).encode("utf-8", "replace").decode("utf-8") for t in texts]
        for row, encoding in enumerate(self.hf.encode_batch(texts)):
            ids = encoding.ids
            if len(ids) > self.text_len:
                if not self._warned:
                    warnings.warn(f"caption cut to {self.text_len} tokens (had {len(ids)}): {texts[row][:60]!r}",
                                  stacklevel=2)
                    self._warned = True
                ids = ids[: self.text_len]
            block[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return block

    def decode(self, block: torch.Tensor) -> list[str]:
        """(B, text_len) ids -> captions, padding dropped."""
        if block.dim() == 1:
            block = block[None]
        return [self.hf.decode([i for i in row.tolist() if i < self.vocab_size]).strip() for row in block]

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))


def load_tokenizer(path: str | Path, text_len: int, bpe_dropout: float = 0.0) -> Tokenizer:
    """Loads a tokenizer file written by `train-tokenizer` (a HF `tokenizers` JSON)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception subclasses
        raise TokenizerError(f"{path} is not a tokenizers file: {str(error).splitlines()[0]}") from None
    return Tokenizer(hf, text_len, bpe_dropout)
