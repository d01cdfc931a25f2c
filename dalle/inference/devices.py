"""Where a model runs and in what precision: `--device auto|cpu|cuda|cuda:N`, `--dtype auto|float32|bfloat16|float16`.

`auto` device: the first CUDA device when there is one, else the CPU. `auto` dtype:
bfloat16 on a GPU that has it (float16 on one that has not); on the CPU, bfloat16 only
where a start-up probe (`cpu_prefers_bf16`) measures a bf16 matmul clearly faster than a
float32 one: many CPUs have no bf16 units, and there bf16 runs 2-3x slower. A dtype the
device cannot run is a one-line error naming both.

Threads: `choose_threads` measures whether all cores beat one on a small matmul at
start-up. On an idle machine they do; beside another busy job, a second thread waits on a
descheduled core at every op and a small model runs 5-40x slower than on one thread.
"""

from __future__ import annotations

import functools
import os
import time

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
        return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
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


# ----------------------------------------------------------------------------- start-up probes

BF16_GAIN = 1.3  # bf16 must beat float32 by this factor: autocast's casts cost the rest
THREADS_GAIN = 1.3  # all cores must beat one by this factor, or one thread is steadier


def matmul_gflops(dtype: torch.dtype = torch.float32, size: int = 512, threads: int | None = None,
                  seconds: float = 0.05) -> float:
    """Measured GFLOP/s of a size x size matmul on the CPU in `dtype`, on `threads` threads
    (default: torch's current number), after one warm-up call, over about `seconds`."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        torch.mm(a, b)
        calls, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and calls >= 3:
                return 2 * size**3 * calls / elapsed / 1e9
    finally:
        torch.set_num_threads(previous)


@functools.cache
def cpu_prefers_bf16() -> bool:
    """Whether bf16 is the faster precision on this CPU: a bf16 matmul at least BF16_GAIN x the
    float32 one, measured once per process (about 0.1 s; 256 x 256, where a CPU without bf16
    units emulates it at a few GFLOP/s)."""
    return matmul_gflops(torch.bfloat16, size=256) >= BF16_GAIN * matmul_gflops(torch.float32, size=256)


def cpu_count() -> int:
    """The cores this process may run on (its affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def measured_threads() -> int:
    """All cores when they run a 256 x 256 matmul at least THREADS_GAIN x as fast as one core
    does (an idle machine), else 1 (a busy one); measured once per process."""
    cores = cpu_count()
    if cores == 1:
        return 1
    one = matmul_gflops(torch.float32, size=256, threads=1)
    every = matmul_gflops(torch.float32, size=256, threads=cores)
    return cores if every >= THREADS_GAIN * one else 1


MAX_THREADS = 4096  # more is a typo (torch's own limit is a C int)


def choose_threads(spec: str | int | None = "auto") -> int:
    """`auto` (the measured rule, `measured_threads`) or a count, applied with
    torch.set_num_threads; returns the count. DALLE_THREADS in the environment overrides auto."""
    spec = os.environ.get("DALLE_THREADS", "auto") if spec in (None, "auto") else spec
    if str(spec).strip().lower() == "auto":
        threads = measured_threads()
    else:
        try:
            threads = int(spec)
        except ValueError:
            raise DalleError(f"--threads must be auto or a positive count, got {spec!r}") from None
        if not 1 <= threads <= MAX_THREADS:
            raise DalleError(f"--threads must be auto or a count in [1, {MAX_THREADS}], got {spec!r}")
    torch.set_num_threads(threads)
    return threads


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for the next allocation (training only).

    A training step allocates and frees the same activations every step. By default glibc
    hands large blocks back to the kernel (mmap, trimming the heap), and every step then
    page-faults them in again, zeroed: about 4,000 faults and 10-17 ms of system time a
    step on the benchmark's model. With allocations up to 32 MiB served from the heap and the
    heap trimmed only beyond 1 GiB free, freed blocks are reused (250 faults a step). The
    resident size stays at the step's peak between steps. Returns False, changing nothing,
    where the C library has no `mallopt` (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def precision_label(dtype: torch.dtype) -> str:
    """`bf16` or `fp32` (or the dtype's name), for progress bar lines."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


def run_label(device: torch.device, precision: str) -> str:
    """`fp32, 2 threads` on the CPU, the precision alone on a GPU: how a run computes, for progress lines."""
    if device.type == "cuda":
        return precision
    threads = torch.get_num_threads()
    return f"{precision}, {threads} thread{'s' if threads > 1 else ''}"
