"""Saving and loading a model directory: `config.json` + `model.safetensors`, never pickle.

Writes are atomic: everything goes into a temporary sibling directory, is fsynced, and
is renamed into place, so a killed process leaves either the old directory or the new
one, never half of one. Loading names the first mismatch in one line (wrong kind of
model, missing or unexpected weights, other shapes) instead of a stack of shape errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dalle.config_io import ConfigError, from_dict, to_dict
from dalle.errors import DalleError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: which shard holds each tensor
FORMAT_VERSION = 1


class CheckpointError(DalleError):
    """A model directory that is missing, corrupt, or made for another model."""


def fsync_directory(path: Path) -> None:
    """Flushes a directory entry to disk (no-op where the OS does not support it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class InUseError(DalleError):
    """Another process is writing the same output or run directory."""


@contextlib.contextmanager
def lock_directory(directory: str | Path) -> Iterator[Path]:
    """Holds an advisory lock on `directory` (created if missing) while the block runs.

    A second writer (another `dalle` process) gets a one-line "in use by process N" error
    instead of mixing its files with the first one's. The lock is taken on the directory
    itself (flock on its descriptor), so no file is left in it, and it ends with the
    process: a killed run never leaves a stale lock behind.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DalleError(f"{directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InUseError(f"{directory} is in use by process {_lock_holder(descriptor)}") from None
        yield directory
    finally:
        os.close(descriptor)


def _lock_holder(descriptor: int) -> str:
    """The PID holding a flock on this file, read from /proc/locks (Linux); '?' elsewhere."""
    stat = os.fstat(descriptor)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
                return fields[4]
    return "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(target: str | Path) -> None:
    """Finishes or undoes a swap of `atomic_directory` that a killed process left half done.

    A kill between its two renames leaves no `target`, the complete old copy as
    `.NAME.old-PID` and the complete new one as `.NAME.tmp-PID-*`: the old copy comes back.
    Leftovers of dead processes are removed; those of live ones are left alone.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for leftover in sorted(target.parent.glob(f".{target.name}.old-*")) + sorted(
            target.parent.glob(f".{target.name}.tmp-*")):
        pid = leftover.name.rsplit(".", 1)[-1].split("-")[1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if ".old-" in leftover.name and not target.exists():
            os.replace(leftover, target)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yields a temporary directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_directory(temporary)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Writes JSON to `path` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(payload, indent=2))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes UTF-8 text to `path` through a new temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)  # replaces a symlink at `path` itself, never the file it points to
    finally:
        Path(name).unlink(missing_ok=True)


def state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict safetensors accepts: contiguous, CPU, no shared storage."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}


def save_model(model: torch.nn.Module, config: Any, directory: str | Path, kind: str,
               extra: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
               max_shard_size: int | str | None = None) -> Path:
    """Saves `model` and its config dataclass as a model directory.

    Args:
        model: the module whose weights are written.
        config: the dataclass that rebuilds the module (`kind`'s config class).
        directory: the model directory to (re)write.
        kind: what the model is ("dvae", "transformer", "clip"); checked on load.
        extra: more JSON-able facts to keep beside the config (metrics, tokenizer name).
        state: the weights to write instead of `model.state_dict()` (e.g. the consolidated
            state of a sharded FSDP model).
        max_shard_size: above this size (bytes or "5GB"), the weights are split into
            `model-0000i-of-0000n.safetensors` shards with an index (Hugging Face's layout).
    """
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": to_dict(config), **(extra or {})}
    with atomic_directory(directory) as temporary:
        tensors = state_for_saving(model) if state is None else {
            name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
        write_weights(tensors, temporary, kind, max_shard_size)
        (temporary / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return Path(directory)


def read_model_meta(directory: str | Path, kind: str) -> dict[str, Any]:
    """Reads and checks `config.json` of a model directory made for `kind`."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    recover_directory(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got a {type(meta).__name__}")
    found = meta.get("kind")
    if found != kind:
        raise CheckpointError(f"{directory} holds a {found!r} model, expected a {kind!r} model")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {version!r} is not one this dalle reads "
                              f"(up to {FORMAT_VERSION}): written by a newer version?")
    return meta


def load_model(directory: str | Path, kind: str, config_class: type, build,
               legacy: dict | None = None) -> tuple[torch.nn.Module, Any]:
    """Loads a model directory written by `save_model`.

    Args:
        directory: the model directory.
        kind: the expected kind ("dvae", ...).
        config_class: the dataclass of that kind's config.
        build: a callable that makes the module from a config instance.
        legacy: config fields that files written before the field existed lack, with the value
            those files meant.

    Returns:
        The module (in eval mode) and its config.
    """
    directory = Path(directory)
    meta = read_model_meta(directory, kind)
    try:
        saved = meta.get("config", {})
        if isinstance(saved, dict):  # (anything else is from_dict's one-line error)
            saved = {**(legacy or {}), **saved}
        config = from_dict(config_class, saved, source=str(directory / CONFIG_FILE))
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    model = build(config)
    state = read_weights(directory)
    check_state_matches(model, state, str(directory))
    bad = next((name for name, tensor in state.items() if tensor.is_floating_point() and
                not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise CheckpointError(f"{directory}: weight '{bad}' holds NaN or infinite values")
    model.load_state_dict(state)
    model.eval()
    return model, config


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, kind: str,
                  max_shard_size: int | str | None = None) -> None:
    """model.safetensors, or shards and their index when the weights exceed `max_shard_size`."""
    if max_shard_size is None:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"kind": kind})
        return
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: tensors[name] for name in names}, str(directory / filename), metadata={"kind": kind})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "kind": kind}, "weight_map": split.tensor_to_filename}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a model directory: model.safetensors, or the shards its index names."""
    single, index_path = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            files = [directory / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index_path} is not a readable shard index: {error}") from None
        if any(Path(name).name != name for name in weight_map.values()):
            raise CheckpointError(f"{index_path} names a shard outside its directory")
    else:
        raise CheckpointError(f"{directory} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX})")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    return state


def check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Raises one line naming the first missing, unexpected or misshapen weight."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        raise CheckpointError(f"{where}: missing weight '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected weight '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: weight '{name}' has shape {tuple(state[name].shape)}, "
                                  f"the config builds {tuple(tensor.shape)}")
        if state[name].is_floating_point() != tensor.is_floating_point():  # int weights would load as zeros
            raise CheckpointError(f"{where}: weight '{name}' is {state[name].dtype}, the model's is {tensor.dtype}")
