"""Where a model runs and in what precision: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|float32|bfloat16|float16`.

`auto` device: the first CUDA device when there is one, else the CPU. `auto` dtype:
bfloat16 on a GPU that has it (float16 on one that has not), float32 on the CPU (where a
start-up probe decides elsewhere whether bf16 pays: many CPUs have no bf16 units). A dtype
the device cannot run is a one-line error naming both.
"""

from __future__ import annotations

import torch

from dalle.errors import DalleError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device that exists on this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DalleError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DalleError(f"device {spec} asked for, but this machine has no CUDA GPU (use --device cpu)")
    if index and int(index) >= torch.cuda.device_count():
        raise DalleError(f"device {spec} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(spec)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`, `float32`, `bfloat16` or `float16` as a dtype the device can run."""
    if isinstance(spec, torch.dtype):
        spec = str(spec).removeprefix("torch.")
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise DalleError(f"unknown dtype {spec!r}: use auto, float32, bfloat16 or float16")
    dtype = DTYPES[spec]
    if device.type == "cpu" and dtype == torch.float16:
        raise DalleError("dtype float16 cannot run on the cpu here (no half-precision matmul units): "
                         "use bfloat16 or float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DalleError(f"dtype bfloat16 cannot run on {device} ({torch.cuda.get_device_name(device)}): "
                         f"use float16 or float32")
    return dtype
