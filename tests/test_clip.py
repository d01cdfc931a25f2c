"""The CLIP model: shapes, normalisation, temperature, loss, learning, save/load, bad input."""

import math

import pytest
import torch

from dalle.checkpoint import CheckpointError, save_model
from dalle.config import CLIPConfig, ConfigError
from dalle.errors import DalleError
from dalle.models.clip import CLIP, load_clip, save_clip

BPE = 20  # BPE ids in [0, 20); padding at position i is 20 + i
TEXT_LEN = 6


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run several times slower with 2 OpenMP threads on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**changes) -> CLIPConfig:
    values = dict(embed_dim=16, text_dim=16, text_depth=2, text_heads=2, vision_dim=16, vision_depth=2,
                  vision_heads=2, patch_size=4, image_size=8, text_len=TEXT_LEN, text_vocab=BPE + TEXT_LEN)
    values.update(changes)
    return CLIPConfig(**values)


def captions(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Random caption blocks with the project's per-position padding."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randint(0, BPE, (len(lengths), TEXT_LEN), generator=generator)
    pads = BPE + torch.arange(TEXT_LEN)
    for row, length in enumerate(lengths):
        block[row, length:] = pads[length:]
    return block


def pictures(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0, **changes) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(tiny_config(**changes))


@pytest.mark.parametrize("tower", [dict(vision_stem=0), dict(vision_stem=8),
                                   dict(vision_tower="conv", conv_width=8, image_size=16)],
                         ids=["vit", "vit-stem", "conv"])
def test_shapes_and_normalised_embeddings(tower):
    model = make_model(**tower)
    text, image = model.encode_text(captions([3, 6, 1, 0])), model.encode_image(pictures(4))
    assert text.shape == image.shape == (4, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    out = model(captions([3, 6, 1, 2]), pictures(4))
    assert out["logits_per_image"].shape == (4, 4)
    torch.testing.assert_close(out["logits_per_text"], out["logits_per_image"].t())
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])


def test_logits_are_scaled_cosines():
    model = make_model()
    text_ids, images = captions([2, 4, 5]), pictures(3)
    out = model(text_ids, images)
    expected = model.logit_scale * model.encode_image(images) @ model.encode_text(text_ids).t()
    torch.testing.assert_close(out["logits_per_image"], expected)


def test_temperature_starts_at_one_over_0_07_and_is_clamped_at_100():
    model = make_model()
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(1000.0))
    assert model.logit_scale.item() == pytest.approx(100.0)


def test_loss_is_the_symmetric_cross_entropy_with_distinct_captions():
    model = make_model()
    text_ids, images = captions([2, 3, 4, 5, 6]), pictures(5)
    out = model(text_ids, images)
    labels = torch.arange(5)
    ce = torch.nn.functional.cross_entropy
    expected = (ce(out["logits_per_image"], labels) + ce(out["logits_per_text"], labels)) / 2
    torch.testing.assert_close(out["loss"], expected)


def test_identical_captions_share_the_target():
    model = make_model()
    text_ids = captions([2, 3, 4])
    text_ids[2] = text_ids[0]  # pictures 0 and 2 have the same caption
    out = model(text_ids, pictures(3))
    targets = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    log_p_image = out["logits_per_image"].log_softmax(-1)
    log_p_text = out["logits_per_text"].log_softmax(-1)
    expected = -((targets * log_p_image).sum(-1).mean() + (targets * log_p_text).sum(-1).mean()) / 2
    torch.testing.assert_close(out["loss"], expected)


def test_hard_negatives_are_extra_columns_of_the_picture_loss_only():
    model = make_model()
    text_ids, images = captions([2, 3, 4]), pictures(3)
    negatives = captions([5, 6], seed=1)
    negatives[1] = text_ids[2]  # a "negative" identical to caption 2 is one more positive of picture 2
    out = model(text_ids, images, negatives)
    assert out["logits_per_image"].shape == (3, 5) and out["logits_per_text"].shape == (3, 3)
    image_targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0.5, 0, 0.5]])
    log_p_image = out["logits_per_image"].log_softmax(-1)
    text_loss = torch.nn.functional.cross_entropy(out["logits_per_text"], torch.arange(3))
    expected = (-(image_targets * log_p_image).sum(-1).mean() + text_loss) / 2
    torch.testing.assert_close(out["loss"], expected)
    # Without negatives the batch columns score the same: the negatives only add columns.
    torch.testing.assert_close(model(text_ids, images)["logits_per_image"], out["logits_per_image"][:, :3])


def test_negative_pictures_are_extra_columns_of_the_caption_loss_only():
    model = make_model()
    text_ids, images = captions([2, 3, 4]), pictures(3)
    twins, twin_ids = pictures(2) * 0.5, captions([5, 6], seed=1)
    twin_ids[1] = text_ids[2]  # the second extra picture fits caption 2: one more positive of it
    out = model(text_ids, images, negative_images=twins, negative_image_ids=twin_ids)
    assert out["logits_per_image"].shape == (3, 3) and out["logits_per_text"].shape == (3, 5)
    plain = model(text_ids, images)
    torch.testing.assert_close(out["logits_per_text"][:, :3], plain["logits_per_text"])
    text_targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0.5, 0, 0.5]])
    log_p_text = out["logits_per_text"].log_softmax(-1)
    image_loss = torch.nn.functional.cross_entropy(out["logits_per_image"], torch.arange(3))
    torch.testing.assert_close(out["loss"], (-(text_targets * log_p_text).sum(-1).mean() + image_loss) / 2)
    with pytest.raises(DalleError, match="negative_images and negative_image_ids together"):
        model(text_ids, images, negative_images=twins)
    with pytest.raises(DalleError, match="one caption per picture"):
        model(text_ids, images, negative_images=twins, negative_image_ids=twin_ids[:1])


def test_hard_negatives_teach_word_order():
    # Four pictures whose twins hold the same tokens with the first two swapped: without
    # the twins as negatives nothing asks the model to tell the orders apart (the control),
    # with them every picture must clearly prefer its own order.
    text_ids = captions([4, 4, 3, 5], seed=2)
    twins = text_ids.clone()
    twins[:, [0, 1]] = twins[:, [1, 0]]
    images = pictures(4, seed=2)
    margins = {}
    for use_twins in (False, True):
        model = make_model(seed=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(150):
            loss = model(text_ids, images, twins if use_twins else None)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            image = model.encode_image(images)
            margins[use_twins] = (image * (model.encode_text(text_ids) - model.encode_text(twins))).sum(-1)
    assert margins[False].abs().max() < 0.01, margins
    assert (margins[True] > 0.2).all(), margins


def test_padding_is_ignored_and_empty_captions_stay_finite():
    model = make_model()
    text_ids = captions([0, 3])
    text = model.encode_text(text_ids)
    assert torch.isfinite(text).all()
    # A real token's output must not depend on what follows it as padding: the 3-token
    # caption embeds the same whether it is alone or batched with others.
    torch.testing.assert_close(model.encode_text(text_ids[1:]), text[1:])
    # Changing a real token changes the embedding; masking is not hiding the words.
    other = text_ids[1:].clone()
    other[0, 1] = (other[0, 1] + 1) % BPE
    assert not torch.allclose(model.encode_text(other), text[1:])


@pytest.mark.parametrize("tower", ["vit", "conv"])
def test_overfits_eight_pairs(tower):
    model = make_model(seed=1, vision_tower=tower, conv_width=8, image_size=8 if tower == "vit" else 16)
    text_ids, images = captions([2, 3, 4, 5, 6, 3, 4, 5], seed=1), pictures(8, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(80):
        loss = model(text_ids, images)["loss"]
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(text_ids, images)
    assert float(out["loss"]) < 0.1 * first
    assert (out["logits_per_image"].argmax(-1) == torch.arange(8)).all()


def test_other_picture_sizes_are_resized():
    model = make_model()
    assert model.encode_image(pictures(2, size=16)).shape == (2, 16)


@pytest.mark.parametrize("tower", ["vit", "conv"])
def test_save_load_round_trip(tmp_path, tower):
    model = make_model(seed=3, vision_tower=tower, conv_width=8, image_size=8 if tower == "vit" else 16)
    with torch.no_grad():
        model.log_logit_scale.fill_(2.5)
    save_clip(model, tmp_path / "clip", extra={"note": "test"})
    loaded = load_clip(tmp_path / "clip")
    assert loaded.config == model.config and not loaded.training
    text_ids, images = captions([2, 5]), pictures(2)
    expected = model(text_ids, images)["logits_per_image"]
    torch.testing.assert_close(loaded(text_ids, images)["logits_per_image"], expected)


def test_load_rejects_other_models(tmp_path):
    save_model(torch.nn.Linear(2, 2), tiny_config(), tmp_path / "other", kind="dvae")
    with pytest.raises(CheckpointError, match="expected a 'clip' model"):
        load_clip(tmp_path / "other")
    save_clip(make_model(), tmp_path / "clip")
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(tmp_path / "nothing")


def test_same_seed_same_model():
    a, b = make_model(seed=5), make_model(seed=5)
    text_ids, images = captions([3, 4]), pictures(2)
    torch.testing.assert_close(a(text_ids, images)["loss"], b(text_ids, images)["loss"])


def test_bad_input_is_one_line():
    model = make_model()
    with pytest.raises(DalleError, match="caption blocks of shape"):
        model.encode_text(torch.zeros(2, TEXT_LEN + 1, dtype=torch.long))
    with pytest.raises(DalleError, match="caption ids"):
        model.encode_text(torch.full((1, TEXT_LEN), BPE + TEXT_LEN))
    with pytest.raises(DalleError, match="pictures of shape"):
        model.encode_image(torch.rand(2, 1, 8, 8))
    with pytest.raises(DalleError, match="2 captions for 3 pictures"):
        model(captions([1, 2]), pictures(3))
    with pytest.raises(ConfigError, match="clip.text_vocab"):
        tiny_config(text_vocab=TEXT_LEN)
    with pytest.raises(ConfigError, match="clip.vision_tower"):
        tiny_config(vision_tower="resnet")
    with pytest.raises(ConfigError, match="clip.conv_width"):
        tiny_config(vision_tower="conv", conv_width=12, image_size=16)
    with pytest.raises(ConfigError, match="clip.image_size"):
        tiny_config(vision_tower="conv", conv_width=8, image_size=8)


def test_empty_batches():
    model = make_model()
    assert model.encode_text(captions([])).shape == (0, 16)
    assert model.encode_image(pictures(0)).shape == (0, 16)


def test_shapes_evaluation_reports_classification_and_search(tiny_pipeline):
    from dalle.config import load_config
    from dalle.evaluation.stages import evaluate_clip_shapes
    from tests.conftest import TINY

    config = load_config(TINY, [f"run_dir={tiny_pipeline}"])
    metrics = evaluate_clip_shapes(config, n=48)
    assert set(metrics) == {"classify_accuracy", "classify_accuracy_held_out", "search_top5_precision",
                            "search_top5_precision_worst_label", "twin_accuracy_order",
                            "twin_accuracy_binding", "twin_accuracy_attribute", "twin_accuracy_shape"}
    for name, value in metrics.items():
        assert value != value or 0.0 <= value <= 1.0, name  # NaN only when no held-out picture came up
    assert metrics["search_top5_precision_worst_label"] <= metrics["search_top5_precision"]
