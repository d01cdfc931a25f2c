"""Reranking, zero-shot classification and search through the Scorer interface (ours and HF's)."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.config import CLIPConfig
from dalle.errors import DalleError
from dalle.images import tensor_to_pil
from dalle.inference.scorers import load_scorer
from dalle.inference.scoring import (
    CLIPScorer,
    Scorer,
    classify,
    embed_images,
    rerank,
    score_images,
    search,
    top_k,
)
from dalle.models.clip import CLIP, save_clip

BPE, TEXT_LEN = 30, 8


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times slower with 2 OpenMP threads on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharTokenizer:
    """A stand-in for the project tokenizer: one id per character, per-position padding."""

    text_len = TEXT_LEN
    total_vocab = BPE + TEXT_LEN

    def encode(self, texts: list[str]) -> torch.Tensor:
        block = (BPE + torch.arange(TEXT_LEN)).repeat(len(texts), 1)  # (n, T) all padding
        for row, text in enumerate(texts):
            ids = [ord(c) % BPE for c in text][:TEXT_LEN]
            block[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return block


def our_scorer(seed: int = 0) -> CLIPScorer:
    torch.manual_seed(seed)
    config = CLIPConfig(embed_dim=16, text_dim=16, text_depth=1, text_heads=2, vision_dim=16, vision_depth=1,
                        vision_heads=2, patch_size=4, image_size=8, text_len=TEXT_LEN, text_vocab=BPE + TEXT_LEN)
    return CLIPScorer(CLIP(config), CharTokenizer())


def pictures(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Random pictures whose values are exact in 8 bits, so PIL round trips are lossless."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 255


class ColourScorer:
    """A hand-made scorer whose answers are known: a picture is its mean colour."""

    logit_scale = 10.0
    embed_dim = 3
    words = {"red": [1.0, 0, 0], "green": [0, 1.0, 0], "blue": [0, 0, 1.0], "orange": [1.0, 0.7, 0]}

    def embed_texts(self, texts):
        return F.normalize(torch.tensor([self.words[t] for t in texts]), dim=-1)

    def embed_images(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)


def solid(colours: list[list[float]], size: int = 4) -> torch.Tensor:
    return torch.tensor(colours)[:, :, None, None].expand(-1, -1, size, size).clone()


def test_both_scorers_satisfy_the_interface():
    assert isinstance(our_scorer(), Scorer) and isinstance(ColourScorer(), Scorer)


def test_scores_equal_the_models_own_logits():
    scorer = our_scorer()
    images = pictures(5)
    logits = scorer.model(scorer.tokenizer.encode(["a red"] * 5), images)["logits_per_image"][:, 0]
    torch.testing.assert_close(score_images(scorer, "a red", images), logits.detach())


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_batched_scoring_equals_unbatched(batch_size):
    scorer = our_scorer()
    images = pictures(7)
    order, scores = rerank(scorer, "a square", images, batch_size=batch_size)
    full_order, full_scores = rerank(scorer, "a square", images, batch_size=len(images))
    torch.testing.assert_close(scores, full_scores, atol=1e-5, rtol=1e-5)
    assert order.tolist() == full_order.tolist()
    assert scores[order].tolist() == sorted(scores.tolist(), reverse=True)


def test_pil_images_score_like_tensors():
    scorer = our_scorer()
    images = pictures(4)
    as_pil = [tensor_to_pil(image) for image in images]
    torch.testing.assert_close(embed_images(scorer, as_pil), embed_images(scorer, images), atol=1e-5, rtol=1e-5)


def test_rerank_puts_the_best_match_first():
    images = solid([[0.1, 0.1, 0.9], [0.9, 0.1, 0.1], [0.5, 0.5, 0.1]])
    order, scores = rerank(ColourScorer(), "red", images, batch_size=2)
    assert order.tolist() == [1, 2, 0]
    assert scores.shape == (3,)


def test_classification_probabilities():
    images = solid([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.3, 0.3, 0.3]])
    probs = classify(ColourScorer(), images, ["red", "green", "blue"], batch_size=3)
    assert probs.shape == (4, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert probs[:3].argmax(-1).tolist() == [0, 1, 2]
    torch.testing.assert_close(probs[3], torch.full((3,), 1 / 3))  # grey fits all colours alike
    ours = classify(our_scorer(), pictures(3), ["a red", "a blue"], batch_size=2)
    torch.testing.assert_close(ours.sum(-1), torch.ones(3))


def test_search_returns_the_best_first():
    scorer = ColourScorer()
    images = solid([[0.1, 0.9, 0.1], [0.9, 0.2, 0.1], [0.1, 0.1, 0.9], [0.9, 0.6, 0.1], [0.6, 0.1, 0.1]])
    index = embed_images(scorer, images, batch_size=2)
    hits, scores = search(scorer, "red", index, k=3)
    assert hits.tolist() == [4, 1, 3]
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    assert search(scorer, "orange", index, k=10)[0].tolist()[:1] == [3]
    assert len(search(scorer, "red", index, k=10)[0]) == 5  # k > N: every picture, ranked


def test_top_k_on_plain_embeddings():
    embeddings = F.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]]), dim=-1)
    hits, cosines = top_k(embeddings, torch.tensor([1.0, 0]), 2)
    assert hits.tolist() == [0, 2]
    torch.testing.assert_close(cosines, torch.tensor([1.0, 2 ** -0.5]))


def test_empty_inputs():
    scorer = ColourScorer()
    assert embed_images(scorer, torch.zeros(0, 3, 4, 4)).shape == (0, 3)
    order, scores = rerank(our_scorer(), "a red", [], batch_size=4)
    assert order.shape == scores.shape == (0,)
    with pytest.raises(DalleError, match="at least one label"):
        classify(scorer, solid([[1.0, 0, 0]]), [])
    with pytest.raises(DalleError, match="query is empty"):
        search(scorer, "  ", embed_images(scorer, solid([[1.0, 0, 0]])), k=1)
    with pytest.raises(DalleError, match="k must be"):
        search(scorer, "red", embed_images(scorer, solid([[1.0, 0, 0]])), k=0)
    with pytest.raises(DalleError, match="batch size"):
        embed_images(scorer, solid([[1.0, 0, 0]]), batch_size=0)


def test_load_scorer_for_our_clip(tmp_path):
    scorer = our_scorer(seed=2)
    save_clip(scorer.model, tmp_path / "clip")
    with pytest.raises(DalleError, match="needs the project tokenizer"):
        load_scorer(tmp_path / "clip")
    loaded = load_scorer(tmp_path / "clip", tokenizer=CharTokenizer())
    images = pictures(3)
    torch.testing.assert_close(score_images(loaded, "a red", images), score_images(scorer, "a red", images))


def test_missing_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(DalleError, match="needs transformers"):
        load_scorer("hf:openai/clip-vit-base-patch32")


# --- a Hugging Face CLIP, built offline: random tiny weights and a letter-level tokenizer ---

def save_tiny_hf_clip(directory) -> None:
    transformers = pytest.importorskip("transformers")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    (directory / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizerFast(vocab_file=str(directory / "vocab.json"),
                                               merges_file=str(directory / "merges.txt"))
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16},
                                                      crop_size={"height": 16, "width": 16})
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(directory)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def test_hf_scores_equal_the_models_own_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tiny_hf_clip(tmp_path / "hf")
    scorer = load_scorer(f"hf:{tmp_path / 'hf'}")
    assert isinstance(scorer, Scorer) and scorer.embed_dim == 8
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)) for i in range(5)]
    model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = model(**processor(text=["a red circle"], images=images, return_tensors="pt", padding=True))
    order, scores = rerank(scorer, "a red circle", images, batch_size=2)
    torch.testing.assert_close(scores, expected.logits_per_image[:, 0], atol=1e-4, rtol=1e-4)
    assert order.tolist() == expected.logits_per_image[:, 0].argsort(descending=True).tolist()
    # Tensors in [0, 1] go through the same processor, as 8-bit pictures.
    tensors = pictures(3, size=16)
    torch.testing.assert_close(embed_images(scorer, tensors),
                               embed_images(scorer, [tensor_to_pil(image) for image in tensors]))
    probs = classify(scorer, images, ["a red circle", "a blue square"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_hf_bad_model_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(DalleError, match="cannot load the Hugging Face CLIP"):
        load_scorer(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(DalleError, match="needs a model name"):
        load_scorer("hf:")
