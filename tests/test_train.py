import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dalle.config import TrainConfig, load_config
from dalle.training import loop, stages
from dalle.training.batches import TableBatches
from dalle.training.loop import TrainingError, TrainingInterrupted, fit, lr_factor
from dalle.training.state import checkpoints

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


def test_broken_files_in_a_folder_are_counted_and_training_goes_on(tmp_path, caplog):
    from .test_data import make_folder

    make_folder(tmp_path / "data", n_good=18)
    config = load_config(TINY, [f"run_dir={tmp_path / 'run'}", f"data.source=folder:{tmp_path / 'data'}",
                                "train.dvae.steps=2"])
    stages.train_dvae(config, progress=False)
    assert "18 pairs read, 2 skipped (2 broken image)" in caplog.text
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


# ----------------------------------------------------------------------------- accelerate, used as meant


@pytest.mark.slow
def test_gradient_accumulation_all_reduces_once_per_update(tmp_path):
    """Two gloo processes, 3 updates of 4 micro-steps: DDP all-reduces 3 times, not 12."""
    import json
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", str(root / "tests" / "ddp_worker.py"), str(tmp_path), "4"],
                         cwd=root, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    assert [r["allreduces"] for r in reports] == [3, 3]
    assert reports[0]["weight_sum"] == reports[1]["weight_sum"]  # the processes stayed in step


class ScaledAccelerator(Accelerator):
    """fp16-style loss scaling on the CPU: accelerate makes its GradScaler only on a GPU, so the
    test hands it one (torch's GradScaler runs on the CPU too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        ScaledAccelerator.last = self

    def prepare(self, *args):
        prepared = super().prepare(*args)
        self.native_amp = True
        return prepared


def test_overflow_steps_lower_the_loss_scale_and_training_goes_on(tmp_path, monkeypatch):
    """An infinite gradient under loss scaling: the step is skipped, the scale halves, training goes on.

    (A loop that skips `optimizer.step()` itself never lets the scaler update: the next
    step fails with "unscale_() has already been called".)"""
    monkeypatch.setattr(loop, "Accelerator", ScaledAccelerator)
    model = torch.nn.Linear(4, 1)
    data = TableBatches({"x": torch.randn(64, 4)}, batch_size=8)

    def overflow_at_2_and_3(model, batch, step):
        loss = model(batch["x"]).pow(2).mean()
        return {"loss": loss * float("inf") if step in (2, 3) else loss}

    config = TrainConfig(steps=6, batch_size=8, warmup_steps=1, log_every=1)
    result = fit(model, data, overflow_at_2_and_3, config, tmp_path, "a", lambda m, d: None, progress=False)
    assert result.skipped_steps == 2 and result.steps == 6
    assert ScaledAccelerator.last.scaler.get_scale() == 2.0**14  # halved twice
    assert torch.isfinite(model.weight).all()


def test_mixed_precision_comes_from_the_launch_unless_the_yaml_sets_it(tmp_path, monkeypatch):
    seen = []

    def step_fn(model, batch, step):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return {"loss": model(batch["x"]).float().pow(2).mean()}

    data = TableBatches({"x": torch.randn(16, 4)}, batch_size=8)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    for yaml_value, expected in ((None, True), ("no", False)):
        seen.clear()
        config = TrainConfig(steps=2, batch_size=8, warmup_steps=1, log_every=1, mixed_precision=yaml_value)
        fit(torch.nn.Linear(4, 1), data, step_fn, config, tmp_path / str(yaml_value), "a", lambda m, d: None,
            progress=False)
        assert seen == [expected, expected], yaml_value


def test_the_fsdp_state_path_resumes_bit_identically(tmp_path, monkeypatch):
    """FSDP saves through accelerate's save_state/load_state; run here on one process (FSDP itself
    needs GPUs), the path round-trips weights, optimizer, scheduler and RNGs exactly."""
    monkeypatch.setattr(loop.Run, "fsdp", property(lambda self: True))

    def train(run_dir, stop_after=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        data = TableBatches({"x": torch.randn(64, 4)}, batch_size=8, seed=1)
        config = TrainConfig(steps=8, batch_size=8, warmup_steps=2, log_every=1, checkpoint_every=2)
        step = lambda m, b, s: {"loss": m(b["x"]).pow(2).mean()}
        fit(model, data, step, config, run_dir, "m", lambda m, d: None, progress=False, stop_after=stop_after)
        return model

    straight = train(tmp_path / "straight")
    train(tmp_path / "stopped", stop_after=3)
    saved = checkpoints(tmp_path / "stopped" / "train-state" / "m")
    assert [s for s, _ in saved] == [2, 3] and (saved[-1][1] / "accelerate").is_dir()
    resumed = train(tmp_path / "stopped")
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_a_resumed_log_has_each_step_once(tmp_path):
    config = dvae_config(tmp_path, "train.dvae.log_every=1")
    stages.train_dvae(config, progress=False, stop_after=3)
    log_path = tmp_path / "logs" / "dvae.jsonl"
    with open(log_path, "a", encoding="utf-8") as handle:  # logged after the checkpoint, then killed
        handle.write('{"step": 4, "loss": 1.0}\n')
    stages.train_dvae(config, progress=False)
    import json

    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_damaged_stage_directory_is_named_not_taken_as_trained(tiny_pipeline, tmp_path):
    """train-all keeps stages already in the run directory; one whose files are broken is an
    error naming it (it used to count as trained, and train-all exited 0)."""
    import shutil

    from dalle.errors import DalleError

    run = tmp_path / "run"
    shutil.copytree(tiny_pipeline, run)
    config = load_config(TINY, [f"run_dir={run}"])
    assert all(stages.is_trained(config, stage) for stage in stages.stage_names(config))
    (run / "clip" / "model.safetensors").unlink()
    with pytest.raises(DalleError, match="clip has no model.safetensors.*remove"):
        stages.is_trained(config, "clip")
    (run / "transformer" / "config.json").write_text('{"kind": "dvae", "config": {}}')
    with pytest.raises(DalleError, match="holds a 'dvae' model, expected a 'transformer'"):
        stages.is_trained(config, "transformer")
    shutil.rmtree(run / "dvae")
    assert not stages.is_trained(config, "dvae")
