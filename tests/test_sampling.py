"""Sampling: cached == uncached for every pattern, guidance, priming, filters, seeds,
and that no input is changed."""

import pytest
import torch

from dalle.config import TransformerConfig
from dalle.errors import DalleError
from dalle.inference.sampling import choose_tokens, guide, sample_image_codes, top_k_filter, top_p_filter
from dalle.models.transformer import DalleTransformer, empty_captions


def peaked_model(attention: list[str], depth: int = 2, seed: int = 0) -> DalleTransformer:
    """A tiny model with large weights, so its distributions are far from uniform and a
    wrong cache or mask would change which tokens win."""
    config = TransformerConfig(dim=32, depth=depth, heads=2, text_len=5, text_vocab=25, image_vocab=16,
                               image_grid=4, conv_kernel=3, attention=attention)
    torch.manual_seed(seed)
    model = DalleTransformer(config)
    with torch.no_grad():
        model.image_head.weight.mul_(30)
        model.image_emb.weight.mul_(20)
        model.text_emb.weight.mul_(20)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
    return model.eval()


def captions(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 20, (batch, 5), generator=torch.Generator().manual_seed(seed))


ATTENTIONS = [["paper"], ["causal"], ["row"], ["column"], ["conv"]]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_equals_uncached(attention, cond_scale):
    model = peaked_model(attention, depth=4 if attention == ["paper"] else 2)
    text = captions()
    for settings in (dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=5, seed=3)):
        cached, cached_logits = sample_image_codes(model, text, num_candidates=2, cond_scale=cond_scale,
                                                   return_logits=True, **settings)
        plain, plain_logits = sample_image_codes(model, text, num_candidates=2, cond_scale=cond_scale,
                                                 use_cache=False, return_logits=True, **settings)
        assert torch.equal(cached, plain), settings
        assert torch.allclose(cached_logits, plain_logits, atol=1e-4), settings
    assert cached.shape == (4, 16) and cached.dtype == torch.long
    assert cached_logits.shape == (4, 16, 16)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sparse_decode_equals_dense_decode(attention):
    model = peaked_model(attention, depth=4 if attention == ["paper"] else 2)
    text = captions()
    sparse, sparse_logits = sample_image_codes(model, text, seed=3, cond_scale=2.0, return_logits=True)
    model.sparse_decode = False
    dense, dense_logits = sample_image_codes(model, text, seed=3, cond_scale=2.0, return_logits=True)
    assert torch.equal(sparse, dense)
    assert torch.allclose(sparse_logits, dense_logits, atol=1e-4)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_static_decode_step_equals_decode_step(attention):
    """The fixed-shape step (whole cache + mask row) computes what the sparse step does."""
    model = peaked_model(attention, depth=4 if attention == ["paper"] else 2)
    text = captions()
    cache, static_cache = model.new_cache(2), model.new_cache(2)
    with torch.no_grad():
        logits = model.prefill(text, None, cache)
        static_logits = model.prefill(text, None, static_cache)
        for index in range(model.image_len - 1):
            token = logits.argmax(-1)
            logits = model.decode_step(token, index, cache)
            static_logits = model.static_decode_step(token, torch.tensor(index), static_cache.data)
            static_cache.length += 1
            assert torch.allclose(logits, static_logits, atol=1e-4), index
    assert torch.allclose(cache.data, static_cache.data, atol=1e-5)


def test_compiled_step_gives_the_same_tokens():
    """compile_step=True: torch.compile of the static step (inductor on CPU here) samples
    the eager tokens, with guidance and priming; a second call reuses the compiled step."""
    model = peaked_model(["row", "conv"], depth=2)
    text = captions(2)
    prime = torch.randint(0, 16, (2, 2), generator=torch.Generator().manual_seed(0))
    settings = dict(num_candidates=2, seed=5, cond_scale=2.0, top_k=8, prime=prime)
    eager = sample_image_codes(model, text, **settings)
    compiled = sample_image_codes(model, text, compile_step=True, **settings)
    assert torch.equal(eager, compiled)
    assert list(model._static_decoders) == [(8, "cpu", torch.float32)]  # 2 captions x 2 candidates x guidance
    again = sample_image_codes(model, text, compile_step=True, **settings)
    assert torch.equal(again, eager)
    with pytest.raises(DalleError, match="use_cache=False"):
        sample_image_codes(model, text, compile_step=True, use_cache=False)


def test_logits_are_the_models_own():
    # The logits each token was drawn from are the teacher-forced logits of the codes.
    model = peaked_model(["paper"], depth=4)
    text = captions()
    codes, logits = sample_image_codes(model, text, seed=0, return_logits=True)
    assert torch.allclose(logits, model(text, codes)["logits_image"], atol=1e-4)
    assert not torch.equal(codes[0], codes[1])  # the captions matter


@pytest.mark.parametrize("cond_scale", [0.0, 2.5, 4.0])
def test_guided_logits(cond_scale):
    model = peaked_model(["paper"], depth=4)
    text = captions()
    codes, logits = sample_image_codes(model, text, cond_scale=cond_scale, seed=5, num_candidates=2,
                                       return_logits=True)
    rows_text = text.repeat_interleave(2, dim=0)
    with torch.no_grad():
        cond = model(rows_text, codes)["logits_image"]
        uncond = model(empty_captions(4, 25, 5), codes)["logits_image"]
    assert torch.allclose(logits, uncond + cond_scale * (cond - uncond), atol=1e-3)
    assert torch.allclose(guide(torch.cat([cond, uncond]), cond_scale), uncond + cond_scale * (cond - uncond))


def test_scale_one_is_plain_conditional_and_zero_is_unconditional():
    model = peaked_model(["row", "column"])
    text = captions()
    plain = sample_image_codes(model, text, seed=2)
    assert torch.equal(sample_image_codes(model, text, seed=2, cond_scale=1.0), plain)
    unconditional = sample_image_codes(model, empty_captions(2, 25, 5), seed=2)
    assert torch.equal(sample_image_codes(model, text, seed=2, cond_scale=0.0), unconditional)


def test_seed_repeats_and_batching_does_not_matter():
    model = peaked_model(["paper"], depth=4)
    text = captions(3)
    first = sample_image_codes(model, text, seed=11, num_candidates=3, top_p=0.9)
    assert torch.equal(first, sample_image_codes(model, text, seed=11, num_candidates=3, top_p=0.9))
    assert torch.equal(first, sample_image_codes(model, text, seed=11, num_candidates=3, top_p=0.9, batch_size=2))
    assert not torch.equal(first, sample_image_codes(model, text, seed=12, num_candidates=3, top_p=0.9))
    # The candidates of one caption differ from each other.
    assert len({tuple(row.tolist()) for row in first[:3]}) > 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_priming_keeps_the_prime(use_cache):
    model = peaked_model(["paper"], depth=4)
    text = captions()
    prime = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    codes = sample_image_codes(model, text, prime=prime, num_candidates=2, seed=4, use_cache=use_cache,
                               cond_scale=2.0)
    assert torch.equal(codes[:, :6], prime.repeat_interleave(2, dim=0))
    assert torch.equal(codes, sample_image_codes(model, text, prime=prime, num_candidates=2, seed=4,
                                                 use_cache=not use_cache, cond_scale=2.0))
    full = torch.randint(0, 16, (2, 16))
    assert torch.equal(sample_image_codes(model, text, prime=full), full)


@pytest.mark.parametrize("use_cache", [True, False])
def test_an_edit_keeps_every_code_outside_the_region(use_cache):
    model = peaked_model(["paper"], depth=4)
    text = captions()
    keep = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(5))
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, 2:4] = True  # a box in the middle of the right side: codes before and after it are kept
    keep_mask = ~region.flatten()
    codes = sample_image_codes(model, text, keep=keep, keep_mask=keep_mask, num_candidates=3, seed=1,
                               use_cache=use_cache, cond_scale=2.0)
    rows = keep.repeat_interleave(3, dim=0)
    assert torch.equal(codes[:, keep_mask], rows[:, keep_mask])
    assert not torch.equal(codes[:, ~keep_mask], rows[:, ~keep_mask])  # the peaked model redraws the region
    assert torch.equal(codes, sample_image_codes(model, text, keep=keep, keep_mask=keep_mask, num_candidates=3,
                                                 seed=1, use_cache=not use_cache, cond_scale=2.0))
    top_rows = torch.arange(16) < 6  # priming is the edit that keeps the first positions
    assert torch.equal(sample_image_codes(model, text, keep=keep, keep_mask=top_rows, num_candidates=2, seed=4),
                       sample_image_codes(model, text, prime=keep[:, :6], num_candidates=2, seed=4))


def test_stopping_and_continuing_gives_the_whole_run():
    model = peaked_model(["paper"], depth=4)
    text = captions(batch=1)
    whole = sample_image_codes(model, text, num_candidates=3, seed=7, cond_scale=2.0)
    part = sample_image_codes(model, text, num_candidates=3, seed=7, cond_scale=2.0, stop=8)
    assert torch.equal(part[:, :8], whole[:, :8]) and not part[:, 8:].any()
    rest = sample_image_codes(model, text.expand(3, -1), num_candidates=1, seed=7, cond_scale=2.0, keep=part,
                              keep_mask=torch.arange(16) < 8)
    assert torch.equal(rest, whole)


def test_nothing_is_changed_in_place():
    model = peaked_model(["paper"], depth=4).train()
    text = captions()
    prime = torch.randint(0, 16, (2, 3))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    text_copy, prime_copy = text.clone(), prime.clone()
    sample_image_codes(model, text, prime=prime, cond_scale=3.0, seed=0, num_candidates=2)
    sample_image_codes(model, text, prime=prime, cond_scale=3.0, seed=0, use_cache=False)
    assert torch.equal(text, text_copy) and torch.equal(prime, prime_copy)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert model.training  # the mode is restored


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, -2.0, -3.0, -4.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(kept)])
    assert torch.equal(top_k_filter(logits, None), logits) and torch.equal(top_k_filter(logits, 9), logits)


def test_top_p_filter():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, True, False],
                                                                   [True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.79)).tolist()[0] == [False, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist()[0] == [False, True, True, True]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum(dim=1).tolist() == [1, 1]  # the best always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_choose_tokens_follows_the_distribution():
    logits = torch.tensor([0.1, 0.2, 0.7]).log().expand(20000, 3)
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(choose_tokens(logits, uniforms), minlength=3).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.1, 0.2, 0.7]), atol=0.02)
    # Temperature sharpens, top-k cuts, greedy takes the best.
    sharp = torch.bincount(choose_tokens(logits, uniforms, temperature=0.5), minlength=3).float() / 20000
    assert sharp[2] > 0.8
    assert set(choose_tokens(logits, uniforms, top_k=2).tolist()) == {1, 2}
    assert set(choose_tokens(logits, uniforms, temperature=0.0).tolist()) == {2}


def test_bad_arguments_are_one_line_errors():
    model = peaked_model(["row"])
    text = captions()
    for kwargs in (dict(text=text[:, :3]), dict(text=text.float()), dict(text=text + 100),
                   dict(prime=torch.zeros(2, 17, dtype=torch.long)), dict(prime=torch.full((2, 2), 99)),
                   dict(num_candidates=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                   dict(batch_size=0)):
        arguments = dict(text=text) | kwargs
        with pytest.raises(DalleError):
            sample_image_codes(model, arguments.pop("text"), **arguments)
