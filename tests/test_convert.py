"""Parity with OpenAI's released dVAE code: build small dall_e modules, pickle them whole
(as OpenAI shipped encoder.pkl / decoder.pkl), convert, and compare outputs.

dall_e is installed by scripts/setup.sh, so this test imports it plainly: a missing
package is a failure here, not a skip.
"""

from __future__ import annotations

import json

import dall_e
import pytest
import torch
import torch.nn.functional as F

import dalle
from dalle.cli import main
from dalle.errors import DalleError
from dalle.models.convert import convert_openai_dvae
from dalle.models.dvae import decode, encode, load_dvae, squeeze_pixels

from .conftest import TINY

ATOL = 1e-5


def _randomise_biases(module: torch.nn.Module, seed: int) -> None:
    """OpenAI initialises biases to zero; random ones make the mapping of every bias count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(".b"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    torch.manual_seed(0)
    # The smallest sizes dall_e's validators accept: n_hid >= 64, vocab_size >= 512.
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=2, vocab_size=512)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=512)
    _randomise_biases(encoder, 1)
    _randomise_biases(decoder, 2)
    directory = tmp_path_factory.mktemp("openai")
    torch.save(encoder, directory / "encoder.pkl")  # whole modules, as OpenAI released them
    torch.save(decoder, directory / "decoder.pkl")
    return encoder.eval(), decoder.eval(), directory


def test_converted_dvae_matches_openai(openai_files, tmp_path):
    encoder, decoder, directory = openai_files
    out = convert_openai_dvae(directory / "encoder.pkl", directory / "decoder.pkl", tmp_path / "dvae",
                              trust_pickle=True, image_size=16)
    model = load_dvae(out)
    assert (model.config.groups, model.config.hidden, model.config.blocks_per_group) == (4, 64, 2)
    assert (model.config.codebook_size, model.config.decoder_init) == (512, 32)

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # (B, 3, H, W) in [0, 1]
    with torch.no_grad():
        # Encoder: their Encoder is fed map_pixels(images); ours squeezes internally.
        theirs = encoder(dall_e.map_pixels(images))  # (B, 512, 2, 2)
        ours = model.encoder(squeeze_pixels(images, model.config.eps))
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert torch.equal(encode(model, images), theirs.argmax(dim=1))

        # Decoder on soft codes: all 2C output channels (location and log-scale).
        soft = torch.softmax(torch.randn(2, 512, 2, 2, generator=torch.Generator().manual_seed(4)), dim=1)
        torch.testing.assert_close(model.decoder(soft), decoder(soft), atol=ATOL, rtol=0)

        # decode(codes) against OpenAI's recipe: one-hot -> decoder -> unmap(sigmoid(first 3)).
        codes = torch.randint(0, 512, (2, 2, 2), generator=torch.Generator().manual_seed(5))
        one_hot = F.one_hot(codes, 512).permute(0, 3, 1, 2).float()
        expected = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
        torch.testing.assert_close(decode(model, codes), expected, atol=ATOL, rtol=0)


def test_convert_requires_trust_pickle(openai_files, tmp_path):
    _, _, directory = openai_files
    with pytest.raises(DalleError, match="--trust-pickle") as error:
        convert_openai_dvae(directory / "encoder.pkl", directory / "decoder.pkl", tmp_path / "out", trust_pickle=False)
    assert "executes code" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_convert_rejects_mismatched_or_missing_files(openai_files, tmp_path):
    _, _, directory = openai_files
    other = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(other, tmp_path / "decoder.pkl")
    with pytest.raises(DalleError, match="do not match"):
        convert_openai_dvae(directory / "encoder.pkl", tmp_path / "decoder.pkl", tmp_path / "out", trust_pickle=True)
    with pytest.raises(DalleError, match="not found"):
        convert_openai_dvae(tmp_path / "nope.pkl", directory / "decoder.pkl", tmp_path / "out", trust_pickle=True)
    # An encoder given as the decoder.
    with pytest.raises(DalleError, match="not a dall_e Decoder"):
        convert_openai_dvae(directory / "encoder.pkl", directory / "encoder.pkl", tmp_path / "out", trust_pickle=True)


def test_train_all_uses_a_converted_openai_dvae(openai_files, tmp_path, capsys):
    """`dvae.pretrained` puts the converted dVAE in the run and skips its training; the rest trains on it."""
    _, _, directory = openai_files
    converted = tmp_path / "openai-dvae"
    assert main(["convert", "openai-dvae", "--encoder", str(directory / "encoder.pkl"), "--decoder",
                 str(directory / "decoder.pkl"), "--out", str(converted), "--trust-pickle", "--image-size", "32"]) == 0
    run = ["train-all", "--config", str(TINY), "--run-dir", str(tmp_path / "run"), "--set",
           f"dvae.pretrained={converted}", "--set", "train.clip.steps=2", "--set", "train.transformer.steps=2"]
    capsys.readouterr()
    assert main(run) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dvae"]["pretrained"] == str(converted)
    assert set(summary) == {"tokenizer", "dvae", "clip", "transformer"}
    assert not (tmp_path / "run" / "train-state" / "dvae").exists()  # not trained
    pipeline = dalle.load_pipeline(tmp_path / "run", device="cpu")
    assert pipeline.grid == 4 and pipeline.transformer.config.image_vocab == 512
    assert main(run) == 0  # everything is there: nothing is trained again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {}
