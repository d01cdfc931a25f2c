"""One training loop for every stage (dVAE, CLIP, transformer), on Hugging Face accelerate.

The loop knows nothing of the models: a stage gives it a model, a `batch_at(step)` data
source and a `step_fn(model, batch, step) -> {"loss": ..., other scalars}`. Because a
batch is a pure function of the step (an epoch permutation seeded by the epoch, or
endless procedural items), resuming needs only the step, the weights, the optimizer and
scheduler state and the RNG states, and gives bit-identical weights to a run that was
never stopped.

On disk, under the run directory:
  STAGE/                      the trained model (config.json + model.safetensors)
  train-state/STAGE/step-N/   training checkpoints: weights, optimizer (safetensors),
                              step, scheduler, RNGs (JSON); written atomically, last K kept
  logs/STAGE.jsonl            one JSON line per log step
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dalle.checkpoint import atomic_directory, save_model, state_for_saving, write_json_atomic
from dalle.config import TrainConfig
from dalle.errors import DalleError

STEP_DIR = re.compile(r"^step-(\d+)$")
MAX_BAD_STEPS_IN_A_ROW = 20


class TrainingError(DalleError):
    """Training cannot go on (data mostly broken, loss keeps blowing up)."""


class TrainingInterrupted(DalleError):
    """SIGTERM or SIGINT: the run wrote a checkpoint and stopped; rerunning resumes it."""


# ----------------------------------------------------------------------------- batches


@dataclass
class TableBatches:
    """Batches from an in-memory table, reshuffled every epoch by a seeded permutation.

    `columns` maps a name to a tensor or list with one row per item; `batch_at(step)`
    gives the same rows for the same step on any run.
    """

    columns: dict[str, Any]
    batch_size: int
    seed: int = 0
    _perm_epoch: int = field(default=-1, repr=False)
    _perm: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def indices_at(self, step: int) -> torch.Tensor:
        n = len(self)
        start = step * self.batch_size
        rows = []
        while len(rows) < self.batch_size:
            epoch, offset = divmod(start + len(rows), n)
            if epoch != self._perm_epoch:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm, self._perm_epoch = torch.randperm(n, generator=generator), epoch
            take = min(self.batch_size - len(rows), n - offset)
            rows.extend(self._perm[offset : offset + take].tolist())
        return torch.tensor(rows)

    def batch_at(self, step: int) -> dict[str, Any]:
        index = self.indices_at(step)
        batch = {}
        for name, column in self.columns.items():
            batch[name] = column[index] if isinstance(column, torch.Tensor) else [column[i] for i in index]
        return batch


@dataclass
class FunctionBatches:
    """Endless batches from a function of the item index (procedural data)."""

    make: Callable[[list[int]], dict[str, Any]]
    batch_size: int

    def batch_at(self, step: int) -> dict[str, Any]:
        return self.make(list(range(step * self.batch_size, (step + 1) * self.batch_size)))


@dataclass
class MappedBatches:
    """Another batch source with a function applied to each batch (e.g. images -> dVAE codes)."""

    inner: Any
    fn: Callable[[dict[str, Any]], dict[str, Any]]

    @property
    def sharded(self) -> bool:
        return getattr(self.inner, "sharded", False)

    def batch_at(self, step: int) -> dict[str, Any]:
        return self.fn(self.inner.batch_at(step))


def collate_pairs(items: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    """(H, W, 3) uint8 arrays + captions -> {"images": uint8 (B, 3, H, W), "captions": [...]}."""
    images = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2).contiguous()
    return {"images": images, "captions": [caption for _, caption in items]}


class StreamBatches:
    """Batches read in order from a streaming source; each process reads only its own share.

    `batch_at(step)` expects steps in order; asked for another step (a resumed run), it
    restarts the stream and skips to it, so the data position is the step itself. When
    the stream ends, the next epoch starts from its beginning.
    """

    sharded = True

    def __init__(self, dataset: torch.utils.data.IterableDataset, batch_size: int, num_workers: int = 0):
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                  collate_fn=collate_pairs)
        self._iterator = None
        self._position = 0

    def _next(self) -> dict[str, Any]:
        try:
            return next(self._iterator)
        except StopIteration:  # a new epoch
            self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                raise TrainingError("the data stream is empty: no usable pairs") from None

    def batch_at(self, step: int) -> dict[str, Any]:
        if self._iterator is None or step != self._position:
            self._iterator, self._position = iter(self.loader), 0
            while self._position < step:
                self._next()
                self._position += 1
        self._position += 1
        return self._next()


def shard(batch: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """This process's rows of a global batch (rows index, index + count, ...)."""
    if count == 1:
        return batch
    return {k: v[index::count] for k, v in batch.items()}


# ----------------------------------------------------------------------------- state files


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": _listify(random.getstate()),
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("cuda")])
    random.setstate(_tuplify(meta["python"]))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, tuple | list) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a state.json) in step order."""
    found = []
    if state_dir.is_dir():
        for path in state_dir.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / "state.json").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


# ----------------------------------------------------------------------------- the loop


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


def fit(model: torch.nn.Module, batches, step_fn: Callable, config: TrainConfig, run_dir: str | Path, stage: str,
        save_fn: Callable[[torch.nn.Module, Path], Any] | None = None, *, resume: str | None = "auto",
        items_per_batch: Callable[[dict], int] | None = None, on_log: Callable | None = None,
        progress: bool = True, stop_after: int | None = None) -> FitResult:
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
        on_log: called with each log record (a dict), e.g. to draw sample grids.
        progress: show a tqdm bar.
        stop_after: stop (with a checkpoint) after this many steps in this call; for tests.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    # Denormal floats (from dead or saturated units) make CPU convolutions many times slower.
    torch.set_flush_denormal(True)
    state_dir = run_dir / "train-state" / stage
    log_path = run_dir / "logs" / f"{stage}.jsonl"
    mixed = config.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        mixed = "bf16"  # fp16 needs a GPU grad scaler; the CPU runs bf16
    trackers = "tensorboard" if importlib.util.find_spec("tensorboard") else None  # when installed
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), log_with=trackers,
                              project_dir=str(run_dir / "logs"))
    if trackers:
        accelerator.init_trackers(stage)
    set_seed(config.seed)

    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=tuple(config.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ema = [p.detach().clone() for p in raw_model.parameters()] if config.ema > 0 else None

    start = 0
    if accelerator.is_main_process and state_dir.is_dir():  # leftovers of a process killed mid-write
        for stale in state_dir.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if resume:
        found = checkpoints(state_dir) if resume == "auto" else [(None, Path(resume))]
        if resume != "auto" and not (Path(resume) / "state.json").is_file():
            raise TrainingError(f"no complete training checkpoint at {resume}")
        if found:
            start = load_training_state(found[-1][1], raw_model, optimizer, scheduler, ema)
            accelerator.print(f"[{stage}] resumed from {found[-1][1]} at step {start}")

    stop_requested = []
    previous_handlers = {}

    def request_stop(signum, frame):  # finish the step, write a checkpoint, then stop
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous_handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: no signal handling
            pass

    history: list[dict[str, float]] = []
    skipped_steps, bad_in_a_row = 0, 0
    last_loss = float("nan")
    items, started = 0, time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=stage, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    step = start
    stopped_early = False
    try:
        model.train()
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            finite = True
            scalars: dict[str, float] = {}
            for micro in range(config.grad_accum):
                global_batch = batches.batch_at(step * config.grad_accum + micro)
                batch = global_batch if getattr(batches, "sharded", False) else shard(
                    global_batch, accelerator.process_index, accelerator.num_processes)
                with accelerator.autocast():
                    out = step_fn(model, batch, step)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    finite = False
                    break
                accelerator.backward(loss / config.grad_accum)
                for key, value in out.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 0:
                        scalars[key] = scalars.get(key, 0.0) + float(value.detach()) / config.grad_accum
                if items_per_batch:
                    items += items_per_batch(global_batch)
            if finite and config.grad_clip > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                finite = bool(torch.isfinite(norm))
                scalars["grad_norm"] = float(norm)
            if not finite:
                skipped_steps += 1
                bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                    raise TrainingError(f"[{stage}] the loss was NaN or infinite {bad_in_a_row} steps in a row at step "
                                        f"{step}; the last good checkpoint is kept in {state_dir}")
            else:
                bad_in_a_row = 0
                optimizer.step()
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in raw_model.parameters()], 1 - config.ema)
            scheduler.step()
            step += 1
            last_loss = scalars.get("loss", float("nan"))
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - started
                if accelerator.num_processes > 1 and scalars:  # log the mean over every process's rows
                    keys = sorted(scalars)
                    means = accelerator.reduce(torch.tensor([scalars[k] for k in keys], device=accelerator.device),
                                               "mean")
                    scalars = dict(zip(keys, means.tolist()))
                    last_loss = scalars.get("loss", last_loss)
                record = {"step": step, "lr": scheduler.get_last_lr()[0], **scalars,
                          "items_per_s": items / elapsed if elapsed > 0 else 0.0, "skipped_steps": skipped_steps}
                history.append(record)
                if accelerator.is_main_process:
                    log_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(log_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{last_loss:.4f}", per_s=f"{record['items_per_s']:.0f}")
                if trackers:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                if on_log and accelerator.is_main_process:
                    on_log(record, raw_model)
            at_checkpoint = config.checkpoint_every and step % config.checkpoint_every == 0
            if stop_requested or (stop_after is not None and step - start >= stop_after):
                stopped_early = step < config.steps
                save_training_state(state_dir, step, raw_model, optimizer, scheduler, ema, config.keep_checkpoints,
                                    accelerator)
                if stop_requested:
                    raise TrainingInterrupted(f"[{stage}] stopped by signal {stop_requested[0]} at step {step}; "
                                              f"the checkpoint is in {state_dir}: run the same command to resume")
                break
            if at_checkpoint and step < config.steps:
                save_training_state(state_dir, step, raw_model, optimizer, scheduler, ema, config.keep_checkpoints,
                                    accelerator)
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if trackers:
        accelerator.end_training()
    if not stopped_early:
        accelerator.wait_for_everyone()
        if ema is not None:  # the published model is the moving average
            with torch.no_grad():
                for param, average in zip(raw_model.parameters(), ema):
                    param.copy_(average)
        full_state = accelerator.get_state_dict(model)  # collective: every process takes part
        if accelerator.is_main_process:
            save_training_state(state_dir, step, raw_model, optimizer, scheduler, None, config.keep_checkpoints,
                                accelerator)
            if save_fn is not None:
                save_fn(raw_model, run_dir / stage)
            else:
                save_model(raw_model, raw_model.config, run_dir / stage, stage, state=full_state)
    return FitResult(step, last_loss, time.perf_counter() - started, skipped_steps, stopped_early, history)


def save_training_state(state_dir: Path, step: int, model, optimizer, scheduler, ema, keep: int, accelerator) -> None:
    """Writes train-state/STAGE/step-N atomically and keeps the newest `keep`."""
    if not accelerator.is_main_process:
        return
    with atomic_directory(state_dir / f"step-{step:08d}") as tmp:
        save_file(state_for_saving(model), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file({f"{i}": t.detach().cpu().contiguous().clone() for i, t in enumerate(ema)},
                      str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_meta,
                                               "scheduler": scheduler.state_dict()})
    for _, old in checkpoints(state_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path, model, optimizer, scheduler, ema) -> int:
    """Restores a checkpoint written by `save_training_state`; returns its step."""
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    optimizer.load_state_dict(optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if ema is not None and (path / "ema.safetensors").is_file():
        saved = load_file(str(path / "ema.safetensors"))
        for i, tensor in enumerate(ema):
            tensor.copy_(saved[str(i)])
    set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
    return int(meta["step"])
