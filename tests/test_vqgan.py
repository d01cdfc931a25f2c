"""The VQGAN image tokenizer: parity with taming-transformers' own modules (both quantizers),
the import of its Lightning checkpoints, training with dead-code restarts, and a whole VQ
pipeline through the commands.

taming-transformers-rom1504 is installed by scripts/setup.sh (without its dependencies), so
this test imports its model and quantizer modules plainly: a missing package is a failure
here, not a skip. Its Lightning model (taming.models.vqgan) is not imported: it needs
pytorch_lightning; the checkpoint is built here as Lightning writes one.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import yaml
from safetensors.torch import load_file
from taming.modules.diffusionmodules.model import Decoder as TamingDecoder
from taming.modules.diffusionmodules.model import Encoder as TamingEncoder
from taming.modules.vqvae.quantize import GumbelQuantize as TamingGumbel
from taming.modules.vqvae.quantize import VectorQuantizer as TamingVQLegacy
from taming.modules.vqvae.quantize import VectorQuantizer2 as TamingVQ

import dalle
from dalle.cli import main
from dalle.config import VQGANConfig, load_config
from dalle.errors import DalleError
from dalle.models.convert import convert_taming_vqgan
from dalle.models.image_tokenizer import ImageTokenizer, load_image_tokenizer
from dalle.models.vqgan import VQGAN, decode, encode, load_vqgan, save_vqgan
from dalle.training import stages
from dalle.training.stages import CodebookRestarts

from .conftest import TINY, VQ_TINY

ATOL = 1e-5
DDCONFIG = {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.0}
EMBED_DIM, N_EMBED = 8, 64  # gumbel: embed_dim must equal z_channels, as in taming
TARGETS = {"vq": "taming.models.vqgan.VQModel", "gumbel": "taming.models.vqgan.GumbelVQ"}


def _fake_lightning_class():
    """A class from a module that is gone by the time the checkpoint is read (as pytorch_lightning
    is absent here): its objects in the checkpoint must not stop the import."""
    module = types.ModuleType("fake_lightning_callbacks")
    module.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    sys.modules[module.__name__] = module
    return module


@pytest.fixture(scope="module", params=["vq", "gumbel"])
def taming_files(request, tmp_path_factory):
    """taming's modules with random weights, saved as a Lightning checkpoint + model.yaml."""
    quantizer = request.param
    torch.manual_seed(0)
    parts = {"encoder": TamingEncoder(**DDCONFIG), "decoder": TamingDecoder(**DDCONFIG),
             "quant_conv": torch.nn.Conv2d(8, EMBED_DIM, 1), "post_quant_conv": torch.nn.Conv2d(EMBED_DIM, 8, 1),
             "quantize": TamingVQ(N_EMBED, EMBED_DIM, beta=0.25) if quantizer == "vq"
             else TamingGumbel(8, EMBED_DIM, N_EMBED)}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight away from its initial value (norms' 1 and 0, zero biases, tiny codebook)
        for part in parts.values():
            for parameter in part.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        codebook = parts["quantize"].embedding if quantizer == "vq" else parts["quantize"].embed
        codebook.weight.copy_(torch.randn(codebook.weight.shape, generator=generator))
    state = {f"{name}.{key}": value for name, part in parts.items() for key, value in part.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # the GAN's: dropped by the import
    fake = _fake_lightning_class()
    directory = tmp_path_factory.mktemp(f"taming-{quantizer}")
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120,
                "callbacks": {fake.ModelCheckpoint: {"best_model_score": 0.1}}}, directory / "last.ckpt")
    del sys.modules[fake.__name__]
    params = {"embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    if quantizer == "gumbel":
        params.update(kl_weight=1.0e-8,
                      temperature_scheduler_config={"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"})
    (directory / "model.yaml").write_text(yaml.safe_dump({"model": {"target": TARGETS[quantizer], "params": params}}))
    for part in parts.values():
        part.eval()
    return quantizer, parts, directory


def test_converted_vqgan_matches_taming(taming_files, tmp_path):
    quantizer, parts, directory = taming_files
    assert main(["convert", "vqgan", "--checkpoint", str(directory / "last.ckpt"), "--config",
                 str(directory / "model.yaml"), "--out", str(tmp_path / "vqgan"), "--trust-pickle"]) == 0
    model = load_image_tokenizer(tmp_path / "vqgan")
    assert isinstance(model, VQGAN) and isinstance(model, ImageTokenizer)
    assert (model.config.quantizer, model.codebook_size, model.grid, model.image_size) == (quantizer, 64, 8, 16)

    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # (B, 3, S, S) in [0, 1]
    with torch.no_grad():
        h = parts["quant_conv"](parts["encoder"](2 * images - 1))  # taming reads [-1, 1]
        torch.testing.assert_close(model.latents(2 * images - 1), h, atol=ATOL, rtol=0)
        if quantizer == "vq":
            z_q, loss, (_, _, indices) = parts["quantize"](h)
            theirs = indices.view(4, 8, 8)
            ours_z_q, ours_loss, ours_codes = model.quantize(h)  # the legacy loss, as taming's
            torch.testing.assert_close(ours_z_q, z_q, atol=ATOL, rtol=0)
            torch.testing.assert_close(ours_loss, loss, atol=ATOL, rtol=1e-5)
            legacy = TamingVQLegacy(N_EMBED, EMBED_DIM, beta=0.25)  # the first VectorQuantizer agrees too
            legacy.load_state_dict(parts["quantize"].state_dict())
            assert torch.equal(legacy(h)[2][2].view(4, 8, 8), theirs)
        else:
            # taming samples gumbel_softmax(hard=True) even in eval mode; the codes are the
            # argmax of its logits (the mode of that sample), which `encode` must give.
            *_, logits = parts["quantize"](h, return_logits=True)
            theirs = logits.argmax(dim=1)  # (B, 8, 8)
        codes = encode(model, images)
        assert codes.dtype == torch.int64 and torch.equal(codes, theirs)
        assert len(codes.unique()) > 10  # a test of many codes, not of one

        codes = torch.randint(0, N_EMBED, (4, 8, 8), generator=torch.Generator().manual_seed(4))
        z_q = parts["quantize"].get_codebook_entry(codes.flatten(), (4, 8, 8, EMBED_DIM))  # (B, D, 8, 8)
        raw = parts["decoder"](parts["post_quant_conv"](z_q))  # (B, 3, 16, 16) in about [-1, 1]
        torch.testing.assert_close(model.decode_latents(model.quantize.embed_codes(codes)), raw, atol=ATOL, rtol=0)
        pictures = decode(model, codes)
        torch.testing.assert_close(pictures, ((raw.clamp(-1, 1) + 1) / 2), atol=ATOL, rtol=0)
        assert 0.0 <= pictures.min() and pictures.max() <= 1.0 and pictures.std() > 0.05


def test_convert_vqgan_requires_trust_pickle(taming_files, tmp_path, capsys):
    _, _, directory = taming_files
    args = ["convert", "vqgan", "--checkpoint", str(directory / "last.ckpt"), "--config", str(directory / "model.yaml"),
            "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-pickle" in err[0] and "executes code" in err[0]
    assert not (tmp_path / "out").exists()


def test_convert_vqgan_names_what_does_not_fit(taming_files, tmp_path):
    quantizer, _, directory = taming_files
    raw = yaml.safe_load((directory / "model.yaml").read_text())
    raw["model"]["target"] = "taming.models.cond_transformer.Net2NetTransformer"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DalleError, match="not taming.models.vqgan.VQModel or GumbelVQ"):
        convert_taming_vqgan(directory / "last.ckpt", tmp_path / "other.yaml", tmp_path / "out", trust_pickle=True)
    raw["model"]["target"] = TARGETS[quantizer]
    raw["model"]["params"]["n_embed"] = 32  # a yaml that does not belong to the checkpoint
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DalleError, match=r"has shape .* \(does the model.yaml belong to it\?\)"):
        convert_taming_vqgan(directory / "last.ckpt", tmp_path / "wrong.yaml", tmp_path / "out", trust_pickle=True)
    assert not (tmp_path / "out").exists()


def test_vqgan_save_load_and_shapes(tmp_path):
    config = VQGANConfig(ch=32, ch_mult=[1, 1], z_channels=8, embed_dim=4, n_embed=16, resolution=16)
    model = VQGAN(config).eval()
    images = torch.rand(2, 3, 16, 16)
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and model.decode(codes).shape == (2, 3, 16, 16)
    loaded = load_vqgan(save_vqgan(model, tmp_path / "vqgan"))
    assert torch.equal(loaded.encode(images), codes) and torch.equal(loaded.decode(codes), model.decode(codes))
    out = VQGAN(config)(images)  # the training objective
    assert set(out) >= {"loss", "recon_loss", "vq_loss", "edge_loss", "codes"} and out["loss"].requires_grad


def test_dead_codes_restart_at_encoder_outputs():
    """A code unused for `after` steps moves onto one of the batch's encoder outputs and is used at once."""
    config = VQGANConfig(ch=32, ch_mult=[1, 1], z_channels=8, embed_dim=4, n_embed=16, resolution=16)
    trainer = CodebookRestarts(VQGAN(config), after=3).train()
    trainer.unused_steps[:5] = torch.tensor([3, 9, 2, 0, 3])  # codes 0, 1 and 4 are dead
    before = trainer.model.quantize.embedding.weight.detach().clone()
    images = torch.rand(2, 3, 16, 16)
    out = trainer(images)
    weight = trainer.model.quantize.embedding.weight.detach()
    z = trainer.model.latents(2 * images - 1).detach().permute(0, 2, 3, 1).reshape(-1, 4)  # (B*h*w, D)
    assert out["restarted"].item() == 3
    for code in (0, 1, 4):
        assert (weight[code] - z).abs().amax(dim=1).min() < 1e-6  # one of the encoder outputs
        assert code in out["codes"]  # used at once
    assert torch.equal(weight[5:], before[5:])  # the living codes are untouched
    used = torch.bincount(out["codes"].flatten(), minlength=16) > 0
    assert torch.equal(trainer.unused_steps[used], torch.zeros(int(used.sum()), dtype=torch.long))


def test_train_vae_trains_a_vqgan(tmp_path, capsys):
    """`dalle train-vae` with image_tokenizer: vqgan: the loss falls, dead codes restart, run_dir/vqgan loads."""
    args = ["train-vae", "--config", str(TINY), "--run-dir", str(tmp_path)]
    for item in [*VQ_TINY, "vqgan.edge_weight=0.5", "train.vqgan.steps=12", "train.vqgan.log_every=1",
                 "train.vqgan.warmup_steps=0"]:
        args += ["--set", item]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["codebook_size"] == 32 and summary["grid"] == 8
    records = [json.loads(line) for line in (tmp_path / "logs" / "vqgan.jsonl").read_text().splitlines()]
    first, last = (sum(r["recon_loss"] for r in part) / 3 for part in (records[:3], records[-3:]))
    assert last < 0.5 * first
    assert sum(r["restarted"] for r in records) > 0
    assert not (tmp_path / "dvae").exists() and (tmp_path / "reports" / "vqgan-metrics.json").is_file()
    assert load_image_tokenizer(tmp_path / "vqgan").kind == "vqgan"


def test_vqgan_training_resumes_bit_exactly(tmp_path):
    """Stopped and resumed, with codebook restarts on the way, the VQGAN ends as if never stopped."""
    def config(run_dir):
        return load_config(TINY, [*VQ_TINY, f"run_dir={run_dir}", "train.vqgan.steps=8",
                                  "train.vqgan.checkpoint_every=2"])

    stages.train_vqgan(config(tmp_path / "straight"), progress=False)
    assert stages.train_vqgan(config(tmp_path / "stopped"), progress=False, stop_after=3)["stopped_early"]
    stages.train_vqgan(config(tmp_path / "stopped"), progress=False)
    straight, resumed = (load_file(str(tmp_path / run / "vqgan" / "model.safetensors"))
                         for run in ("straight", "stopped"))
    assert "unused_steps" not in straight and set(straight) == set(resumed)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    logs = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "vqgan.jsonl").read_text().splitlines()]
    assert sum(r["restarted"] for r in logs) > 0


@pytest.fixture(scope="module")
def vq_pipeline(tmp_path_factory):
    """A whole VQ pipeline: `dalle train-all` with image_tokenizer: vqgan."""
    run_dir = tmp_path_factory.mktemp("vq") / "model"
    args = ["train-all", "--config", str(TINY), "--run-dir", str(run_dir)]
    for item in VQ_TINY:
        args += ["--set", item]
    assert main(args) == 0
    return run_dir


def test_vq_pipeline_generates_edits_and_reconstructs(vq_pipeline, tmp_path, capsys):
    assert (vq_pipeline / "vqgan" / "config.json").is_file() and not (vq_pipeline / "dvae").exists()
    pipeline = dalle.load_pipeline(vq_pipeline, device="cpu")
    assert pipeline.image_tokenizer.kind == "vqgan" and pipeline.grid == 8 and pipeline.image_size == 32

    assert main(["generate", "--model", str(vq_pipeline), "--prompt", "a red circle", "--candidates", "3", "--keep",
                 "2", "--seed", "0", "--out", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "gen" / "samples.jsonl").read_text().splitlines()]
    assert [line["rank"] for line in lines] == [1, 2] and (tmp_path / "gen" / lines[0]["image"]).is_file()

    picture = tmp_path / "gen" / lines[0]["image"]
    assert main(["edit", "--model", str(vq_pipeline), "--image", str(picture), "--box", "0,0,16,16", "--prompt",
                 "a blue square", "--candidates", "2", "--keep", "1", "--out", str(tmp_path / "edit"),
                 "--device", "cpu"]) == 0
    assert len((tmp_path / "edit" / "samples.jsonl").read_text().splitlines()) == 1
    (sample,) = pipeline.edit(picture, (0, 0, 16, 16), "a blue square", candidates=2, keep=1)
    kept = ~torch.tensor([[r < 4 and c < 4 for c in range(8)] for r in range(8)]).flatten()  # cells outside the box
    assert torch.equal(sample.codes[kept], pipeline.encode_image(picture)[0, kept].cpu())

    assert main(["reconstruct", "--model", str(vq_pipeline), "--out", str(tmp_path / "rec.png"), str(picture)]) == 0
    assert (tmp_path / "rec.png").is_file()

    assert main(["imagine", "--model", str(vq_pipeline), "--prompt", "a red circle", "--out", str(tmp_path / "im"),
                 "--steps", "3", "--device", "cpu"]) == 0
    (line,) = [json.loads(line) for line in (tmp_path / "im" / "samples.jsonl").read_text().splitlines()]
    assert (tmp_path / "im" / line["image"]).is_file()


def test_a_vq_pipeline_saves_and_loads_like_a_dvae_one(vq_pipeline, tmp_path):
    pipeline = dalle.load_pipeline(vq_pipeline, device="cpu")
    saved = pipeline.save_pretrained(tmp_path / "saved", max_shard_size=20_000)
    assert (saved / "vqgan" / "config.json").is_file() and not (saved / "dvae").exists()
    assert "VQGAN" in (saved / "README.md").read_text()
    again = dalle.load_pipeline(saved, device="cpu")
    codes = torch.randint(0, again.image_tokenizer.codebook_size, (2, 8, 8))
    assert torch.equal(again.image_tokenizer.decode(codes), pipeline.image_tokenizer.decode(codes))


def test_a_run_keeps_one_image_tokenizer(vq_pipeline, capsys):
    """A run directory trained with a VQGAN is not reused by a dVAE config (its CLIP and transformer would be kept)."""
    capsys.readouterr()
    assert main(["train-all", "--config", str(TINY), "--run-dir", str(vq_pipeline)]) == 2
    assert "holds a vqgan" in capsys.readouterr().err
    assert not (vq_pipeline / "dvae").exists()
