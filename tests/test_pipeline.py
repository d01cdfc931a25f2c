import json
import shutil
import subprocess
import sys

import pytest
import torch

import dalle
from dalle.checkpoint import CheckpointError
from dalle.config import DVAEConfig
from dalle.inference.pipeline import load_pipeline
from dalle.models.dvae import DVAE, save_dvae


def test_pipeline_returns_ranked_pictures(tiny_pipeline):
    pipeline = dalle.load_pipeline(tiny_pipeline)
    results = pipeline(["a red circle", "a blue square above a green circle"], candidates=4, keep=2, seed=3)
    assert len(results) == 2 and all(len(r) == 2 for r in results)
    first = results[0]
    assert [s.rank for s in first] == [1, 2]
    assert first[0].clip_score >= first[1].clip_score
    assert first[0].image.size == (32, 32)
    again = pipeline(["a red circle"], candidates=4, keep=2, seed=3)[0]
    assert [s.image.tobytes() for s in again] == [s.image.tobytes() for s in first]


def test_no_rerank_keeps_sampling_order(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline)
    kept = pipeline(["a red circle"], candidates=3, keep=3, seed=0, rerank_with_clip=False)[0]
    assert [s.candidate for s in kept] == [0, 1, 2] and [s.rank for s in kept] == [1, 2, 3]
    ranked = pipeline(["a red circle"], candidates=3, keep=3, seed=0)[0]
    assert sorted(s.image.tobytes() for s in ranked) == sorted(s.image.tobytes() for s in kept)


def test_priming_keeps_the_top_rows(tiny_pipeline):
    from dalle.data.shapes import render
    from dalle.images import pil_to_tensor
    from dalle.models.dvae import encode

    pipeline = load_pipeline(tiny_pipeline)
    image, caption = render("test", 0, 1, 32)
    out = pipeline([caption], candidates=2, keep=2, prime_image=image, prime_rows=3, rerank_with_clip=False)[0]
    grid = pipeline.dvae.config.grid_size
    want = encode(pipeline.dvae, pil_to_tensor(image)[None]).flatten(1)[0, : 3 * grid]
    for sample in out:  # the primed rows' codes are the picture's own, exactly
        assert torch.equal(sample.codes.flatten()[: 3 * grid].cpu(), want.cpu())


def test_stages_that_do_not_fit_are_named(tiny_pipeline, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline, broken)
    save_dvae(DVAE(DVAEConfig(hidden=8, codebook_size=64, groups=3)), broken / "dvae")
    with pytest.raises(CheckpointError, match="expects 32 image codes, the dVAE has a codebook of 64"):
        load_pipeline(broken)
    shutil.rmtree(broken / "transformer")
    shutil.rmtree(broken / "clip")  # with a CLIP it would be an imagine-only pipeline
    with pytest.raises(CheckpointError, match="transformer is missing"):
        load_pipeline(broken)


def test_import_dalle_and_the_pipeline_import_no_training_code(tiny_pipeline):
    code = ("import sys, dalle; p = dalle.load_pipeline(sys.argv[1]); p(['a red circle'], candidates=2); "
            "print(sorted(m for m in ('accelerate', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_pipeline)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_guided_sampling_runs_through_the_pipeline(tiny_pipeline):
    pipeline = load_pipeline(tiny_pipeline)
    out = pipeline(["a red circle"], candidates=2, keep=1, cond_scale=3.0, top_k=8, temperature=0.8)[0]
    assert len(out) == 1 and isinstance(out[0].clip_score, float)
    assert torch.isfinite(torch.tensor(out[0].clip_score))


def test_eval_writes_metrics_and_report(tiny_pipeline, tmp_path):
    from dalle.cli import main

    assert main(["eval", "--model", str(tiny_pipeline), "--out", str(tmp_path), "--prompts", "2",
                 "--candidates", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"one_object", "two_objects", "held_out", "dvae_psnr"}
    assert 0.0 <= metrics["one_object"]["top1_colour_shape"] <= 1.0
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_a_clip_from_another_run_with_another_text_length_reranks(tiny_pipeline, tmp_path):
    from dalle.config import load_config
    from dalle.training import stages
    from tests.conftest import TINY

    other = tmp_path / "clip-run"
    config = load_config(TINY, [f"run_dir={other}", "tokenizer.text_len=24", "train.clip.steps=2"])
    stages.train_clip(config, progress=False)
    pipeline = load_pipeline(tiny_pipeline, clip=str(other / "clip"))
    assert pipeline.scorer.model.config.text_len == 24 != pipeline.transformer.config.text_len
    samples = pipeline(["a red circle"], candidates=3, keep=3, seed=0)[0]
    scores = [s.clip_score for s in samples]
    assert scores == sorted(scores, reverse=True) and all(s == s for s in scores)
    # The other run's directory names its CLIP as well as the CLIP's own directory does.
    assert load_pipeline(tiny_pipeline, clip=str(other)).scorer.model.config.text_len == 24


def test_sampling_json_sets_the_defaults_and_call_options_override_them(tiny_pipeline, tmp_path):
    from dalle.config import SamplingConfig
    from dalle.inference.pipeline import read_sampling_defaults, write_sampling_defaults

    assert read_sampling_defaults(tiny_pipeline) == SamplingConfig()  # training wrote the config's (default) section
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    write_sampling_defaults(model, SamplingConfig(temperature=0.7, top_k=4, cond_scale=3.0))
    pipeline = load_pipeline(model)
    assert pipeline.sampling == SamplingConfig(temperature=0.7, top_k=4, cond_scale=3.0)

    def pictures(p, **options):
        return [s.image.tobytes() for s in p(["a red circle"], candidates=3, keep=3, seed=1, rerank_with_clip=False,
                                              **options)[0]]

    plain = load_pipeline(tiny_pipeline)
    # The file's settings are what a bare call uses; naming them all gives the same pictures.
    assert pictures(pipeline) == pictures(plain, temperature=0.7, top_k=4, cond_scale=3.0)
    # Options given in the call win; top_k 0 turns the file's filter off.
    assert pictures(pipeline, temperature=1.0, top_k=0, cond_scale=1.0) == pictures(plain)

    (model / "sampling.json").write_text('{"temperature": -1}')
    with pytest.raises(CheckpointError, match="sampling.temperature must be a finite number > 0"):
        load_pipeline(model)
    (model / "sampling.json").write_text('{"temprature": 1}')
    with pytest.raises(CheckpointError, match="unknown key 'temprature'"):
        load_pipeline(model)


def test_eval_records_the_sampling_it_used(tiny_pipeline, tmp_path):
    from dalle.cli import main

    assert main(["eval", "--model", str(tiny_pipeline), "--out", str(tmp_path), "--prompts", "1",
                 "--candidates", "2", "--cond-scale", "2", "--top-k", "5"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["sampling"] == {"temperature": 1.0, "top_k": 5, "top_p": None, "cond_scale": 2.0}
