"""One training loop for every stage (dVAE, CLIP, transformer), on Hugging Face accelerate.

The loop knows nothing of the models: a stage gives it a model, a `batch_at(step)` data
source (`dalle.training.batches`) and a `step_fn(model, batch, step) -> {"loss": ...,
other scalars}`. `fit` is a few named pieces around a small `TrainState`: `_resume`,
`_one_step`, `_log`, `_checkpoint` and `_finish`.

How accelerate is used:
- gradient accumulation: every micro-step but the last runs inside `accelerator.no_sync`,
  so DDP all-reduces the gradients once per update, not once per micro-step;
- a non-finite loss or gradient skips the update; under fp16 loss scaling the optimizer
  step is still called, so the grad scaler sees the overflow and lowers its scale, and
  the skip is read from `accelerator.optimizer_step_was_skipped`;
- mixed precision: `train.STAGE.mixed_precision: auto` picks bf16 on a GPU that has it
  and, on the CPU, bf16 only where a start-up probe measures it faster than float32
  (`dalle.inference.devices.cpu_prefers_bf16`); null leaves it to the launch configuration
  (`accelerate launch --mixed_precision`); the bar's first line says which, and the threads;
- FSDP saves and resumes its sharded training state through `accelerator.save_state`
  / `load_state`; one process and DDP keep the bit-exact safetensors checkpoints of
  `dalle.training.state`.

On disk, under the run directory:
  STAGE/                      the trained model (config.json + model.safetensors)
  train-state/STAGE/step-N/   training checkpoints (`dalle.training.state`)
  logs/STAGE.jsonl            one JSON line per log step
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, send_to_device, set_seed
from tqdm.auto import tqdm

from dalle.checkpoint import atomic_directory, lock_directory, save_model, write_json_atomic
from dalle.config import TrainConfig
from dalle.config_io import to_dict
from dalle.errors import DalleError
from dalle.inference.devices import cpu_prefers_bf16, keep_freed_memory, run_label
from dalle.training.batches import shard
from dalle.training.state import checkpoints, load_training_state, save_training_state

MAX_BAD_STEPS_IN_A_ROW = 20
log = logging.getLogger(__name__)


class TrainingError(DalleError):
    """Training cannot go on (data mostly broken, loss keeps blowing up)."""


class TrainingInterrupted(DalleError):
    """SIGTERM or SIGINT: the run wrote a checkpoint and stopped; rerunning resumes it."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and convolutions only (not on biases, norms, embeddings' scale)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and "norm" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


@dataclass
class FitResult:
    steps: int
    last_loss: float
    seconds: float
    skipped_steps: int
    stopped_early: bool
    history: list[dict[str, float]]


@dataclass
class TrainState:
    """What changes while a stage trains."""

    step: int = 0
    start: int = 0  # the step this call began (or resumed) at
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    last_loss: float = float("nan")
    items: int = 0  # what the throughput counts (tokens, images) since `started`
    started: float = field(default_factory=time.perf_counter)
    history: list[dict[str, float]] = field(default_factory=list)
    stop_signal: int | None = None


@dataclass
class Run:
    """What stays fixed while a stage trains: the prepared model, optimizer and where things go."""

    accelerator: Accelerator
    model: torch.nn.Module  # as prepared (maybe DDP- or FSDP-wrapped)
    raw_model: torch.nn.Module
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: list[torch.Tensor] | None
    config: TrainConfig
    stage: str
    state_dir: Path
    log_path: Path
    trackers: bool
    stage_settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"judge.eps": 3.0}

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP


def fit(model: torch.nn.Module, batches, step_fn: Callable, config: TrainConfig, run_dir: str | Path, stage: str,
        save_fn: Callable[[torch.nn.Module, Path], Any] | None = None, *, resume: str | None = "auto",
        items_per_batch: Callable[[dict], int] | None = None, on_log: Callable | None = None,
        progress: bool = True, stop_after: int | None = None,
        stage_settings: dict[str, Any] | None = None) -> FitResult:
    """Trains `model` for `config.steps` optimizer steps and saves it to run_dir/stage.

    Args:
        model: the module to train.
        batches: anything with `batch_at(step) -> dict` (the global batch of that micro-step).
        step_fn: (model, batch, step) -> dict with "loss" and any other scalars to log.
        config: the stage's TrainConfig.
        run_dir: the run (pipeline) directory.
        stage: "dvae", "clip" or "transformer": names the model, state and log paths.
        save_fn: (unwrapped model, directory) -> None, writes the final model directory;
            default: a model directory of kind `stage` from the consolidated weights (which
            also gathers an FSDP-sharded model into one safetensors file).
        resume: "auto" (newest complete checkpoint, if any), a checkpoint path, or None.
        items_per_batch: counts what the throughput shows (tokens, images) for a batch.
        on_log: called with each log record (a dict) and the unwrapped model, e.g. to draw samples.
        progress: show a tqdm bar.
        stop_after: stop (with a checkpoint) after this many steps in this call; for tests.
        stage_settings: the stage's own settings outside its TrainConfig and model config
            (by their config names); a resumed run must share them too.
    """
    keep_freed_memory()  # every step frees and reallocates the same activations
    run = _prepare(model, config, Path(run_dir), stage)
    run.stage_settings = dict(stage_settings or {})
    with contextlib.ExitStack() as hold:
        if run.accelerator.is_main_process:  # a second trainer of this stage and run is told, not mixed in
            hold.enter_context(lock_directory(run.state_dir))
        return _train(run, batches, step_fn, resume, save_fn, items_per_batch, on_log, progress, stop_after,
                      Path(run_dir))


def _train(run: Run, batches, step_fn: Callable, resume: str | None, save_fn: Callable | None,
           items_per_batch: Callable | None, on_log: Callable | None, progress: bool, stop_after: int | None,
           run_dir: Path) -> FitResult:
    """`fit` once the run is prepared and locked: resume, the steps, the log, checkpoints, the end."""
    config, stage = run.config, run.stage
    state = TrainState()
    state.step = state.start = _resume(run, resume)
    bar = tqdm(total=config.steps, initial=state.start, desc=f"{stage} [{_precision_label(run)}]", dynamic_ncols=True,
               disable=not (progress and run.accelerator.is_main_process))
    stopped_early = False
    with _stop_on_signals(state):
        try:
            run.model.train()
            while state.step < config.steps:
                scalars = _one_step(run, state, batches, step_fn, items_per_batch)
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == config.steps:
                    _log(run, state, scalars, bar, on_log)
                if state.stop_signal is not None or (stop_after is not None and state.step - state.start >= stop_after):
                    stopped_early = state.step < config.steps
                    _checkpoint(run, state.step)
                    if state.stop_signal is not None:
                        raise TrainingInterrupted(
                            f"[{stage}] stopped by signal {state.stop_signal} at step {state.step}; the checkpoint is "
                            f"in {run.state_dir}: run the same command to resume")
                    break
                if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < config.steps:
                    _checkpoint(run, state.step)
        finally:
            bar.close()
    if run.trackers:
        run.accelerator.end_training()
    if not stopped_early:
        _finish(run, state, save_fn, run_dir / stage)
    return FitResult(state.step, state.last_loss, time.perf_counter() - state.started, state.skipped_steps,
                     stopped_early, state.history)


def _prepare(model: torch.nn.Module, config: TrainConfig, run_dir: Path, stage: str) -> Run:
    """The accelerator, the prepared model and optimizer, the scheduler and the EMA copy."""
    # Denormal floats (from dead or saturated units) make CPU convolutions many times slower.
    torch.set_flush_denormal(True)
    mixed = training_precision(config.mixed_precision)
    trackers = importlib.util.find_spec("tensorboard") is not None  # logs to TensorBoard when installed
    # accelerate keeps one global state per process, and one process may train several stages
    # with different precisions (the demo); the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(),
                              log_with="tensorboard" if trackers else None, project_dir=str(run_dir / "logs"))
    if trackers:
        accelerator.init_trackers(stage)
    set_seed(config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    prepared, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(prepared)
    ema = [p.detach().clone() for p in raw_model.parameters()] if config.ema > 0 else None
    run = Run(accelerator, prepared, raw_model, optimizer, scheduler, ema, config, stage,
              run_dir / "train-state" / stage, run_dir / "logs" / f"{stage}.jsonl", trackers)
    if run.fsdp:
        if config.ema > 0:
            raise TrainingError(f"[{stage}] train.ema needs whole weights on every process; FSDP shards them")
        accelerator.register_for_checkpointing(scheduler)  # save_state then keeps the scheduler too
    return run


def training_precision(setting: str | None) -> str | None:
    """accelerate's mixed_precision for a `train.STAGE.mixed_precision` setting: `auto` is bf16
    on a GPU with bf16 (else fp16), and on the CPU bf16 where the start-up probe finds it faster,
    else no, unless a launch configuration sets one; fp16 on the CPU is bf16 (fp16 needs a GPU
    grad scaler); None: the launch configuration."""
    if setting == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):  # `accelerate launch --mixed_precision` said
            return None
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_prefers_bf16() else "no"
    if setting == "fp16" and not torch.cuda.is_available():
        return "bf16"
    return setting


def _precision_label(run: Run) -> str:
    """`fp32, 1 thread` / `bf16, 2 threads`: what this stage runs in, for the bar."""
    mixed = str(run.accelerator.mixed_precision)
    return run_label(run.accelerator.device, "fp32" if mixed == "no" else mixed)


def _resume(run: Run, resume: str | None) -> int:
    """Restores the newest complete checkpoint (or the one named); returns the step to start at."""
    if run.accelerator.is_main_process and run.state_dir.is_dir():  # leftovers of a process killed mid-write
        for stale in run.state_dir.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    if not resume:
        return 0
    if resume != "auto" and not (Path(resume) / "state.json").is_file():
        raise TrainingError(f"no complete training checkpoint at {resume}")
    found = checkpoints(run.state_dir) if resume == "auto" else [(None, Path(resume))]
    if not found:
        return 0
    path = found[-1][1]
    _check_settings(run, path)
    if run.fsdp:
        run.accelerator.load_state(str(path / "accelerate"))
        step = int(json.loads((path / "state.json").read_text(encoding="utf-8"))["step"])
    else:
        step = load_training_state(path, run.raw_model, run.optimizer, run.scheduler, run.ema)
    _cut_log(run, step)
    log.info("[%s] resumed from %s at step %d", run.stage, path, step)
    return step


# Settings that may change between a run and its resumption (how long and how it is logged).
RESUMABLE_CHANGES = {"steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "num_workers",
                     "mixed_precision"}


def _settings(run: Run) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the stage's training and model settings."""
    train = {k: v for k, v in to_dict(run.config).items() if k not in RESUMABLE_CHANGES}
    model_config = getattr(run.raw_model, "config", None)
    return {"train": train, "model": to_dict(model_config) if dataclasses.is_dataclass(model_config) else None,
            "stage": run.stage_settings}


def _check_settings(run: Run, path: Path) -> None:
    """Refuses to resume a checkpoint trained with other settings (naming the first that differs)."""
    try:
        saved = json.loads((path / "state.json").read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return  # a damaged state.json is reported by the loader
    if not isinstance(saved, dict):
        return  # written before settings were recorded
    now = json.loads(json.dumps(_settings(run)))  # as JSON stores it (tuples become lists)
    for part in ("train", "model", "stage"):
        if part not in saved:
            continue  # written before this part was recorded
        for key in sorted(saved.get(part) or {}):  # a setting added after the state was written is not compared
            old, new = saved[part][key], (now.get(part) or {}).get(key)
            if old != new:
                where = {"train": f"train.{run.stage}.{key}", "model": f"{run.stage}.{key}", "stage": key}[part]
                raise TrainingError(f"{run.state_dir} was trained with {where} = {old!r}, now {new!r}: "
                                    f"use another --run-dir, or --resume none to start over")


def _cut_log(run: Run, step: int) -> None:
    """Drops the log lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not run.accelerator.is_main_process or not run.log_path.is_file():
        return
    lines = run.log_path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        run.log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


@contextlib.contextmanager
def _stop_on_signals(state: TrainState):
    """SIGTERM and SIGINT set `state.stop_signal`: the step finishes, a checkpoint is written, then it stops."""
    def request_stop(signum, frame):
        state.stop_signal = signum

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no signal handling
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _one_step(run: Run, state: TrainState, batches, step_fn: Callable,
              items_per_batch: Callable[[dict], int] | None) -> dict[str, float]:
    """One optimizer update over `grad_accum` micro-batches; returns the scalars to log."""
    accelerator, config = run.accelerator, run.config
    run.optimizer.zero_grad(set_to_none=True)
    scalars: dict[str, float] = {}
    for micro in range(config.grad_accum):
        global_batch = batches.batch_at(state.step * config.grad_accum + micro)
        batch = global_batch if getattr(batches, "sharded", False) else shard(
            global_batch, accelerator.process_index, accelerator.num_processes)
        batch = send_to_device(batch, accelerator.device)  # the tensors; captions stay strings
        last = micro == config.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.model):  # all-reduce once per update
            with accelerator.autocast():
                out = step_fn(run.model, batch, state.step)
            # A non-finite loss still goes backward: its NaN gradients reach every process
            # through the all-reduce, so all of them skip this update together.
            accelerator.backward(out["loss"] / config.grad_accum)
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                scalars[key] = scalars.get(key, 0.0) + float(value.detach()) / config.grad_accum
        if items_per_batch:
            state.items += items_per_batch(global_batch)
    # The gradient norm, clipped when grad_clip > 0; infinite max_norm only measures it.
    norm = accelerator.clip_grad_norm_(run.model.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf)
    scalars["grad_norm"] = float(norm)
    finite = math.isfinite(scalars["grad_norm"]) and math.isfinite(scalars.get("loss", 0.0))
    if finite or accelerator.scaler is not None:  # the grad scaler must see an overflow to lower its scale
        run.optimizer.step()
    skipped = not finite or accelerator.optimizer_step_was_skipped
    if skipped:
        run.optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        if state.bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
            raise TrainingError(f"[{run.stage}] the loss was NaN or infinite {state.bad_in_a_row} steps in a row at "
                                f"step {state.step}; the last good checkpoint is kept in {run.state_dir}")
    else:
        state.bad_in_a_row = 0
        if run.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(run.ema, [p.detach() for p in run.raw_model.parameters()], 1 - config.ema)
    run.scheduler.step()
    state.step += 1
    state.last_loss = scalars.get("loss", float("nan"))
    return scalars


def _log(run: Run, state: TrainState, scalars: dict[str, float], bar: tqdm, on_log: Callable | None) -> None:
    """A log record: the mean scalars over every process, to logs/STAGE.jsonl, the bar and TensorBoard."""
    accelerator = run.accelerator
    elapsed = time.perf_counter() - state.started
    if accelerator.num_processes > 1 and scalars:  # the mean over every process's rows
        keys = sorted(scalars)
        means = accelerator.reduce(torch.tensor([scalars[k] for k in keys], device=accelerator.device), "mean")
        scalars = dict(zip(keys, means.tolist()))
        state.last_loss = scalars.get("loss", state.last_loss)
    record = {"step": state.step, "lr": run.scheduler.get_last_lr()[0], **scalars,
              "items_per_s": state.items / elapsed if elapsed > 0 else 0.0, "skipped_steps": state.skipped_steps}
    state.history.append(record)
    if accelerator.is_main_process:
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{state.last_loss:.4f}", per_s=f"{record['items_per_s']:.0f}")
    if run.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
    if on_log and accelerator.is_main_process:
        on_log(record, run.raw_model)


def _checkpoint(run: Run, step: int, with_ema: bool = True) -> None:
    """Writes train-state/STAGE/step-N: safetensors files (one process, DDP) or accelerate's state (FSDP)."""
    if run.fsdp:  # every process writes its shard, into one directory renamed into place by the main one
        _save_fsdp_state(run, step)
        return
    save_training_state(run.state_dir, step, run.raw_model, run.optimizer, run.scheduler,
                        run.ema if with_ema else None, run.config.keep_checkpoints, run.accelerator, _settings(run))


def _save_fsdp_state(run: Run, step: int) -> None:
    accelerator = run.accelerator
    target = run.state_dir / f"step-{step:08d}"
    staging = run.state_dir / f".step-{step:08d}.fsdp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging / "accelerate"), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(staging / "state.json", {"step": step, "fsdp": True, "settings": _settings(run)})
        with atomic_directory(target) as tmp:
            shutil.rmtree(tmp)
            staging.rename(tmp)
        for _, old in checkpoints(run.state_dir)[:-max(1, run.config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _finish(run: Run, state: TrainState, save_fn: Callable | None, model_dir: Path) -> None:
    """The last checkpoint and the published model (the moving average, when there is one)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if run.ema is not None:
        with torch.no_grad():
            for param, average in zip(run.raw_model.parameters(), run.ema):
                param.copy_(average)
    full_state = accelerator.get_state_dict(run.model)  # collective: every process takes part
    bad = next((name for name, tensor in (full_state or {}).items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:  # never publish a model that draws black pictures
        raise TrainingError(f"[{run.stage}] weight '{bad}' is NaN or infinite after training; nothing was saved "
                            f"(lower the learning rate; earlier checkpoints are in {run.state_dir})")
    _checkpoint(run, state.step, with_ema=False)
    if accelerator.is_main_process:
        if save_fn is not None:
            save_fn(run.raw_model, model_dir)
        else:
            save_model(run.raw_model, run.raw_model.config, model_dir, run.stage, state=full_state)
