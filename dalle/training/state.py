"""Training checkpoints: weights, optimizer, scheduler and RNG states, never pickled.

  train-state/STAGE/step-N/   model.safetensors, optimizer.safetensors, rng.safetensors,
                              ema.safetensors (when averaging) and state.json (the step,
                              the optimizer's scalars, the scheduler, the Python/NumPy RNGs)

Each is written to a hidden directory and renamed into place (`atomic_directory`), so a
checkpoint without state.json was never finished and is ignored; the newest K are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dalle.checkpoint import (
    CheckpointError,
    atomic_directory,
    check_state_matches,
    state_for_saving,
    write_json_atomic,
)

STEP_DIR = re.compile(r"^step-(\d+)$")


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




def save_training_state(state_dir: Path, step: int, model, optimizer, scheduler, ema, keep: int, accelerator,
                        settings: dict[str, Any] | None = None) -> None:
    """Writes train-state/STAGE/step-N atomically and keeps the newest `keep`.

    `settings` (what the run was trained with) goes into state.json, for resume to compare."""
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
                                               "scheduler": scheduler.state_dict(), "settings": settings})
    for _, old in checkpoints(state_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(path: Path, model, optimizer, scheduler, ema) -> int:
    """Restores a checkpoint written by `save_training_state`; returns its step.

    A checkpoint of another model (changed sizes) or a damaged one is named in one line."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
        check_state_matches(model, weights, f"the training checkpoint {path} (was the config changed?)")
        model.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_from_files(load_file(str(path / "optimizer.safetensors")),
                                                       meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        if ema is not None and (path / "ema.safetensors").is_file():
            saved = load_file(str(path / "ema.safetensors"))
            for i, tensor in enumerate(ema):
                tensor.copy_(saved[str(i)])
        set_rng_state(load_file(str(path / "rng.safetensors")), meta["rng"])
        return int(meta["step"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, SafetensorError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"the training checkpoint {path} is damaged or of another model ({first}); "
                              f"delete it or pass --resume none") from None
