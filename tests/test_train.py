import os
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dalle import stages
from dalle.config import load_config
from dalle.train import TableBatches, TrainingError, TrainingInterrupted, checkpoints, fit, lr_factor

from .conftest import TINY


def dvae_config(run_dir, *more):
    return load_config(TINY, [f"run_dir={run_dir}", "train.dvae.steps=8", "train.dvae.checkpoint_every=2", *more])


def weights(run_dir, stage="dvae"):
    return load_file(str(run_dir / stage / "model.safetensors"))


def test_resume_after_stop_is_bit_identical(tmp_path):
    straight = tmp_path / "straight"
    stages.train_dvae(dvae_config(straight), progress=False)
    stopped = tmp_path / "stopped"
    first = stages.train_dvae(dvae_config(stopped), progress=False, stop_after=3)
    assert first["stopped_early"] and not (stopped / "dvae").exists()
    assert [step for step, _ in checkpoints(stopped / "train-state" / "dvae")] == [2, 3]
    stages.train_dvae(dvae_config(stopped), progress=False)  # --resume auto
    a, b = weights(straight), weights(stopped)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_a_half_written_checkpoint_is_ignored(tmp_path):
    config = dvae_config(tmp_path)
    model = torch.nn.Linear(4, 1)
    data = TableBatches({"x": torch.randn(64, 4), "y": torch.randn(64, 1)}, batch_size=8)

    def step_fn(model, batch, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
        return {"loss": torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])}

    with pytest.raises(TrainingInterrupted, match="stopped by signal 15 at step 5"):
        fit(model, data, step_fn, config.train.dvae, tmp_path, "lin", lambda m, d: None, progress=False)
    (tmp_path / "train-state" / "lin" / "step-00000099").mkdir()  # killed mid-write: no state.json
    assert checkpoints(tmp_path / "train-state" / "lin")[-1][0] == 5


def test_nan_steps_are_skipped_and_many_stop_the_run(tmp_path):
    config = dvae_config(tmp_path).train.dvae
    model = torch.nn.Linear(4, 1)
    data = TableBatches({"x": torch.randn(64, 4)}, batch_size=8)

    def sometimes_nan(model, batch, step):
        loss = model(batch["x"]).pow(2).mean()
        return {"loss": loss * float("nan") if step in (2, 5) else loss}

    result = fit(model, data, sometimes_nan, config, tmp_path, "a", lambda m, d: None, progress=False)
    assert result.skipped_steps == 2 and torch.isfinite(model.weight).all()
    with pytest.raises(TrainingError, match="NaN or infinite"):
        fit(torch.nn.Linear(4, 1), data, lambda m, b, s: {"loss": m(b["x"]).sum() * float("nan")},
            load_config(None, ["train.dvae.steps=30"]).train.dvae, tmp_path, "b", lambda m, d: None,
            progress=False, resume=None)


def test_table_batches_cover_each_epoch_once_and_repeat():
    data = TableBatches({"i": torch.arange(10)}, batch_size=4, seed=3)
    seen = torch.cat([data.batch_at(step)["i"] for step in range(5)])  # 20 rows: two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    again = TableBatches({"i": torch.arange(10)}, batch_size=4, seed=3)
    assert torch.equal(again.batch_at(3)["i"], data.batch_at(3)["i"])


def test_warmup_then_cosine():
    config = load_config(None, ["train.dvae.steps=100", "train.dvae.warmup_steps=10"]).train.dvae
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(100, config) == pytest.approx(config.min_lr_ratio)


def test_transformer_loss_falls_through_the_stage(tmp_path):
    config = load_config(TINY, [f"run_dir={tmp_path}", "train.dvae.steps=20", "train.transformer.steps=40",
                                "train.transformer.lr=3e-3", "train.transformer.log_every=5"])
    stages.train_dvae(config, progress=False)
    stages.train_transformer(config, progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "logs" / "transformer.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] * 0.8


def test_broken_files_in_a_folder_are_counted_and_training_goes_on(tmp_path, capsys):
    from .test_data import make_folder

    make_folder(tmp_path / "data", n_good=18)
    config = load_config(TINY, [f"run_dir={tmp_path / 'run'}", f"data.source=folder:{tmp_path / 'data'}",
                                "train.dvae.steps=2"])
    stages.train_dvae(config, progress=False)
    assert "18 pairs read, 2 skipped (2 broken image)" in capsys.readouterr().out
    assert (tmp_path / "run" / "dvae" / "model.safetensors").is_file()
    config = load_config(TINY, [f"run_dir={tmp_path / 'run2'}", f"data.source=folder:{tmp_path / 'data'}",
                                "data.max_bad_fraction=0.05", "train.dvae.steps=2"])
    with pytest.raises(Exception, match="broken"):
        stages.train_dvae(config, progress=False)


def test_sample_grids_during_training(tmp_path):
    config = load_config(TINY, [f"run_dir={tmp_path}", "train.dvae.steps=2", "train.transformer.steps=4",
                                "train.transformer.sample_every=2"])
    stages.train_dvae(config, progress=False)
    stages.train_transformer(config, progress=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]


def test_ema_weights_are_the_published_model(tmp_path):
    config = load_config(None, ["train.dvae.steps=6", "train.dvae.ema=0.5", "train.dvae.warmup_steps=1",
                                "train.dvae.lr=0.1"]).train.dvae
    data = TableBatches({"x": torch.randn(64, 4)}, batch_size=8)
    plain, averaged = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    averaged.load_state_dict(plain.state_dict())
    step_fn = lambda m, b, s: {"loss": m(b["x"]).pow(2).mean()}  # noqa: E731
    fit(plain, data, step_fn, replace(config, ema=0.0), tmp_path / "a", "a", lambda m, d: None, progress=False)
    fit(averaged, data, step_fn, config, tmp_path / "b", "b", lambda m, d: None, progress=False)
    assert not torch.equal(plain.weight, averaged.weight)  # the average lags the raw weights
    assert (averaged.weight - plain.weight).abs().max() < 1.0
