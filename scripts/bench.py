#!/usr/bin/env python
"""Speed against the peer, dalle-pytorch 1.6.6, measured in one run on one machine.

Both sides build the same configuration (width, depth, heads, caption and image lengths,
vocabularies, the paper's per-layer attention pattern) and are measured on:

- `train`: transformer training tokens/s (forward + backward + AdamW step, fixed batch);
- `sample`: image tokens/s sampling `--sample-batch` images, each side with its own
  key/value cache switched on (what the peer's switch really does is in PEER_NOTES);
- `sample_guided`: the same with classifier-free guidance (`--cond-scale`);
- `dvae`: each side's own discrete VAE, one training step (same image size, grid,
  codebook and base width; the architectures differ, see the parameter counts);
- `train_bf16`: `train` under bf16 autocast, only on a host whose CPU has bf16 units (our
  start-up rule, `dalle.inference.devices.cpu_prefers_bf16`, says whether it has);
- peak memory of every measurement above.

Before them, the host: the fp32 and bf16 GFLOP/s of a large matmul at the benchmark's
thread count (its peak), and from our training tokens/s the model math it achieves
(6 x non-embedding parameters + 12 x layers x width x sequence FLOPs per token, the
usual count with dense attention), so `training_peak_fraction` is on the page.

Every measurement runs in a fresh subprocess (ours with this interpreter and
`--ours-root` on PYTHONPATH, the peer with `.venv-peer/bin/python`, made by
`scripts/setup_peer.sh`), and the order is interleaved: ours, peer, ours, peer, ... so that
load from other processes on the machine falls on both sides alike. Both sides run the
same torch thread count (`--threads`, printed). Each training figure is timed over
`--train-steps` steps after `--warmup-steps` untimed ones (the peer warms up more slowly:
three steps flattered us by 25 %). Throughput is the median of `--repeats` runs, with
the spread (max - min) / median beside it; memory too is the median of the repeats (the
largest of three moved the peer's training peak, and the memory ratio, by 12% between runs).
After its timed steps our training worker times `--peak-pairs` pairs of (one training step,
one 2048 x 2048 fp32 matmul), so that `training_peak_fraction` (the median over the repeats
of each worker's median over its pairs of the step's model GFLOP/s / the matmul's) compares
the step with what the host offered at that very moment: the peak measured once at the
start moved 30% between runs (64.8 and 47.6 GFLOP/s) on a host with slow hours, and even a
peak measured seconds after the steps moved the fraction by 13% between two runs.

Peak memory: the kernel's resident-set high-water mark (VmHWM), reset through
/proc/self/clear_refs after the imports (including those torch makes on first use: the
first optimizer imports torch._dynamo, 73-80 MiB), so it covers exactly what the measurement
allocates (model, optimizer state, activations, caches) on top of the interpreter and
its libraries. `tracemalloc` would miss torch's tensors (they are not allocated through
Python's allocator), and a whole-process peak would mostly measure how many libraries a
side imports. `workload_mib` = peak - the resident size at the reset; both numbers are in
the raw output.

Output: a Markdown table, then, as the very last line, one JSON object with
`sampling_ratio`, `sampling_guided_ratio`, `training_ratio`, `memory_ratio`, `dvae_ratio`,
`dvae_memory_ratio`, `training_peak_fraction` and, on a bf16 host, `training_ratio_bf16`
(ours / peer: for throughput higher is better for us, for memory lower is) beside every
raw figure.

Usage:
    bash scripts/setup_peer.sh
    PYTHONPATH=$PWD .venv/bin/python scripts/bench.py            # both sides
    .venv/bin/python scripts/bench.py --sides peer --repeats 1   # the peer alone
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("train", "sample", "sample_guided", "dvae", "train_bf16")
SIDES = ("ours", "peer")

# Our pattern names -> dalle-pytorch's attn_types. The peer's axial layers attend within
# the query's row (column) of the image grid; ours follow the paper's masks (dalle.masks).
PEER_ATTN = {"row": "axial_row", "column": "axial_col", "conv": "conv_like", "causal": "full"}
PEER_CONV_KERNEL = 5  # fixed inside dalle-pytorch: DALLE passes no kernel to SparseConvCausalAttention

# What the peer's code does, read in dalle_pytorch 1.6.6 (dalle_pytorch.py, transformer.py).
PEER_NOTES = [
    "generate_images(use_cache=True) hands the cache only to forward_with_cond_scale, which "
    "drops it when cond_scale == 1: plain sampling recomputes the whole stream at every step.",
    "with cond_scale != 1 the cache is used, but its sparse layers (axial/conv) are wrapped in "
    "NonCached, which re-runs the layer over the whole cached input every step; only dense "
    "Attention layers ('full', or axial with optimize_for_inference=True) cache keys/values.",
    "guided + cached: the unconditional pass runs on a shallow copy of the conditional cache, so "
    "after the first step it reads the conditional keys/values (it never sees the empty "
    "caption again), and both passes advance the same token-shift deques.",
    "the unconditional pass zeroes the caption in place (text *= ...) inside the sequence being "
    "generated: without the cache, every step after the first conditions on an empty caption "
    "and the guided logits equal the unguided ones (checked on a tiny model).",
    "generate_images ends with vae.decode; the benchmark replaces that decode by the identity "
    "because our sample_image_codes returns codes, not pixels.",
]


# ----------------------------------------------------------------------------- config


def paper_layout(depth: int) -> list[str]:
    """The paper's per-layer patterns, as dalle.models.masks.layer_patterns(['paper'], depth):
    column where (i - 2) % 4 == 0, row elsewhere, conv in the last layer."""
    patterns = ["column" if (i - 2) % 4 == 0 else "row" for i in range(depth)]
    patterns[-1] = "conv"
    return patterns


def make_spec(args: argparse.Namespace) -> dict:
    """The shared configuration every worker builds its side from."""
    if args.grid & (args.grid - 1):
        raise SystemExit(f"--grid must be a power of 2 (dalle-pytorch's VAE needs it), got {args.grid}")
    if args.dim % args.heads:
        raise SystemExit(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    image_size = args.dvae_image_size
    if image_size % args.grid or (image_size // args.grid) & (image_size // args.grid - 1):
        raise SystemExit("--dvae-image-size must be the grid times a power of 2")
    return {
        "dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim // args.heads,
        "text_len": args.text_len, "text_vocab": args.text_vocab, "image_vocab": args.image_vocab,
        "grid": args.grid, "image_len": args.grid ** 2,
        "attention": paper_layout(args.depth), "conv_kernel": PEER_CONV_KERNEL,
        "ours_mlp_ratio": args.ours_mlp_ratio,
        "train_batch": args.train_batch, "train_steps": args.train_steps, "warmup_steps": args.warmup_steps,
        "sample_batch": args.sample_batch, "cond_scale": args.cond_scale, "sample_budget": args.sample_budget,
        "sample_min_seconds": args.sample_min_seconds,
        "peer_inference": args.peer_inference,
        "dvae_image_size": image_size, "dvae_hidden": args.dvae_hidden, "dvae_layout": args.dvae_layout,
        "dvae_batch": args.dvae_batch,
        "dvae_steps": args.dvae_steps, "peak_pairs": args.peak_pairs,
        "threads": args.threads, "seed": args.seed, "lr": 1e-4,
    }


# ----------------------------------------------------------------------------- measuring (workers)


def _rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def load_lazy_libraries() -> None:
    """Imports what torch loads on first use, before the memory peak is reset: constructing the
    first optimizer imports torch._dynamo and its dependencies (73 MiB resident in the peer's
    venv, 80 in ours, measured), a library rather than the measurement's work, and it used to
    be a third of our training workload figure. Both sides call it."""
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter])
    parameter.grad = torch.zeros(1)
    optimizer.step()


def reset_peak() -> dict:
    """Resets the resident high-water mark; returns the method and the resident size now."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:  # no reset possible: the peak then includes the imports
        method = "ru_maxrss (not reset)"
    return {"method": method, "base_kib": _rss_kib("VmRSS")}


def read_peak(mark: dict) -> dict:
    """Peak resident memory since `reset_peak`, in MiB."""
    peak = _rss_kib("VmHWM")
    return {"peak_rss_mib": round(peak / 1024, 1), "base_rss_mib": round(mark["base_kib"] / 1024, 1),
            "workload_mib": round((peak - mark["base_kib"]) / 1024, 1), "memory_method": mark["method"]}


def _inputs(spec: dict, batch: int):
    """Caption ids in [1, V) (0 is the peer's padding id) and image codes, seeded."""
    import torch

    generator = torch.Generator().manual_seed(spec["seed"])
    text = torch.randint(1, spec["text_vocab"], (batch, spec["text_len"]), generator=generator)
    codes = torch.randint(0, spec["image_vocab"], (batch, spec["image_len"]), generator=generator)
    return text, codes


def _time_train_steps(step, spec: dict) -> float:
    """Seconds per step, after `warmup_steps` untimed steps."""
    for _ in range(spec["warmup_steps"]):
        step()
    start = time.perf_counter()
    for _ in range(spec["train_steps"]):
        step()
    return (time.perf_counter() - start) / spec["train_steps"]


def _train_result(seconds_per_step: float, spec: dict, params: int) -> dict:
    tokens = spec["train_batch"] * (spec["text_len"] + spec["image_len"])
    return {"step_s": seconds_per_step, "tokens_per_s": tokens / seconds_per_step, "params": params}


def _autocast(task: str):
    """bf16 autocast for `train_bf16`, nothing for the other tasks."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if task == "train_bf16" else contextlib.nullcontext()


def model_flops_per_token(model, spec: dict) -> int:
    """Training FLOPs per token of our transformer: 6 x the parameters a token's math uses (the
    blocks, the final norm and one output head; not the embedding tables, which are lookups)
    + 12 x layers x width x sequence length (QK^T and AV, forward and backward, dense)."""
    embeddings = ("text_pos", "image_row", "image_col", "text_emb.", "image_emb.", "text_head.")
    used = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(embeddings))
    sequence = spec["text_len"] + spec["image_len"]
    return 6 * used + 12 * spec["depth"] * spec["dim"] * sequence


def paired_peak_fraction(step, flops_per_step: float, pairs: int) -> dict:
    """Our training step against the host's fp32 matmul peak at the same moments: `pairs`
    times, one training step and then one 2048 x 2048 fp32 matmul, each timed; the fraction
    is the median over the pairs of (the step's model GFLOP/s) / (the matmul's GFLOP/s).

    On a shared host the matmul rate moves 30% within minutes (47-89 GFLOP/s in one hour):
    a peak measured seconds away from the steps, even in the same process, moved the
    fraction by 13% between two benchmark runs; a pair shares whatever the host offered."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=generator)
    b = torch.randn(2048, 2048, generator=generator)
    torch.mm(a, b)  # warm-up
    fractions, peaks = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
        start = time.perf_counter()
        torch.mm(a, b)
        peak = 2 * 2048**3 / (time.perf_counter() - start) / 1e9
        peaks.append(peak)
        fractions.append(flops_per_step / step_s / 1e9 / peak)
    return {"peak_fraction": round(median(fractions), 3), "host_fp32_gflops": round(median(peaks), 1),
            "peak_fraction_spread": spread(fractions)}


def measure_host(spec: dict) -> dict:
    """The host's matmul peak at the benchmark's thread count: fp32 at 2048 x 2048, bf16 at
    1024 x 1024 (256 x 256 on a CPU without bf16 units, where it runs at a few GFLOP/s), and
    our precision rule."""
    import torch

    from dalle.inference.devices import cpu_prefers_bf16, matmul_gflops

    torch.set_num_threads(spec["threads"])
    # A peak is a maximum: the best of three 1-second runs (one run moved 6% between benchmarks).
    fp32 = max(matmul_gflops(torch.float32, size=2048, seconds=1.0) for _ in range(3))
    return {"fp32_gflops": round(fp32, 1),
            "bf16_gflops": round(matmul_gflops(torch.bfloat16, size=1024 if cpu_prefers_bf16() else 256,
                                               seconds=1.0), 1),
            "prefers_bf16": cpu_prefers_bf16(), "threads": torch.get_num_threads()}


class _OverBudget(Exception):
    """Raised from inside a sampling loop when `sample_budget` seconds have passed."""


def _budgeted(fn, spec: dict, state: dict):
    """Wraps the per-token model call of a sampling loop: counts the calls and stops the loop
    (raising _OverBudget) once the budget is spent, so that a slow side still yields a figure."""

    def wrapper(*args, **kwargs):
        if time.perf_counter() - state["start"] > spec["sample_budget"]:
            raise _OverBudget
        out = fn(*args, **kwargs)
        state["calls"] += 1
        return out

    return wrapper


def _run_sampling(run, spec: dict, state: dict, tokens_per_call_offset: int) -> dict:
    """Times `run()`, repeated until `sample_min_seconds` have passed (a fast side's single run
    lasts under a second, too short to time steadily); the rate is over the completed runs.
    On _OverBudget in the first run, reports the tokens made so far (the partial rate covers
    the first, shorter positions only, so for a side that recomputes the stream it is an
    overestimate)."""
    state["start"] = time.perf_counter()
    runs, finished = 0, state["start"]
    try:
        while runs == 0 or finished - state["start"] < spec["sample_min_seconds"]:
            run()
            runs, finished = runs + 1, time.perf_counter()
    except _OverBudget:
        if runs == 0:
            seconds = time.perf_counter() - state["start"]
            done = state["calls"] + tokens_per_call_offset
            return {"seconds": seconds, "tokens_per_s": spec["sample_batch"] * done / seconds, "partial": True,
                    "tokens_done": done, "tokens_wanted": spec["image_len"]}
    seconds = finished - state["start"]
    return {"seconds": seconds, "runs": runs, "tokens_per_s": runs * spec["sample_batch"] * spec["image_len"] / seconds}


def _dvae_result(seconds_per_step: float, spec: dict, params: int) -> dict:
    return {"step_s": seconds_per_step, "images_per_s": spec["dvae_batch"] / seconds_per_step, "params": params}


def _dvae_steps(spec: dict) -> dict:
    return {**spec, "train_steps": spec["dvae_steps"]}


def measure_ours(task: str, spec: dict) -> dict:
    """One measurement of our transformer (dalle.models.transformer + dalle.inference.sampling) or dVAE."""
    import torch

    from dalle.config import DVAEConfig, TransformerConfig
    from dalle.inference.devices import keep_freed_memory
    from dalle.inference.sampling import sample_image_codes
    from dalle.models.dvae import DVAE
    from dalle.models.transformer import DalleTransformer

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    load_lazy_libraries()
    mark = reset_peak()
    if task == "dvae":
        groups = int(math.log2(spec["dvae_image_size"] // spec["grid"])) + 1
        config = DVAEConfig(image_size=spec["dvae_image_size"], hidden=spec["dvae_hidden"], groups=groups,
                            blocks_per_group=1, codebook_size=spec["image_vocab"], layout=spec["dvae_layout"])
        model = DVAE(config).train()
        keep_freed_memory()  # as dalle.training.loop.fit does before training
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
        images = torch.rand(spec["dvae_batch"], 3, config.image_size, config.image_size,
                            generator=torch.Generator().manual_seed(spec["seed"]))

        def step():
            loss = model(images, temperature=1.0, kl_weight=1.0)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = _dvae_result(_time_train_steps(step, _dvae_steps(spec)), spec, _params(model))
        return {**result, **read_peak(mark)}

    if task == "host":
        return measure_host(spec)
    config = TransformerConfig(
        dim=spec["dim"], depth=spec["depth"], heads=spec["heads"], mlp_ratio=spec["ours_mlp_ratio"],
        attention=list(spec["attention"]), conv_kernel=spec["conv_kernel"], caption_dropout=0.0,
        text_len=spec["text_len"], text_vocab=spec["text_vocab"] + spec["text_len"],
        image_vocab=spec["image_vocab"], image_grid=spec["grid"])
    model = DalleTransformer(config)
    if task in ("train", "train_bf16"):
        keep_freed_memory()  # as dalle.training.loop.fit does before training
        text, codes = _inputs(spec, spec["train_batch"])
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])

        def step():
            with _autocast(task):
                loss = model(text, codes)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = _train_result(_time_train_steps(step, spec), spec, _params(model))
        flops = model_flops_per_token(model, spec)
        result["model_gflops"] = round(flops * result["tokens_per_s"] / 1e9, 2)
        result = {**result, "flops_per_token": flops, **read_peak(mark)}
        if task == "train":  # steps paired with matmuls, for the peak fraction
            tokens = spec["train_batch"] * (spec["text_len"] + spec["image_len"])
            result.update(paired_peak_fraction(step, flops * tokens, spec["peak_pairs"]))
        return result

    text, codes = _inputs(spec, spec["sample_batch"])
    model.eval()
    with torch.inference_mode():  # warm-up: one pass over the whole stream, as for the peer
        model(text, codes)
    cond_scale = spec["cond_scale"] if task == "sample_guided" else 1.0
    state = {"calls": 0}
    model.decode_step = _budgeted(model.decode_step, spec, state)  # one call per token after the first

    def run():
        out = sample_image_codes(model, text, top_k=_peer_effective_top_k(spec), cond_scale=cond_scale,
                                 seed=spec["seed"], use_cache=True)
        assert out.shape == (spec["sample_batch"], spec["image_len"]), out.shape

    result = _run_sampling(run, spec, state, tokens_per_call_offset=1)
    return {**result, "params": _params(model), "use_cache": True, **read_peak(mark)}


def _peer_effective_top_k(spec: dict) -> int:
    """The image codes the peer's top_k(filter_thres=0.5) keeps: half of its joint vocabulary
    (text + padding + image), of which only the image codes are not masked out."""
    total = spec["text_vocab"] + spec["text_len"] + spec["image_vocab"]
    return min(max(int(0.5 * total), 1), spec["image_vocab"])


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def register_peer_stand_ins() -> list[str]:
    """Stand-ins for the parts of dalle_pytorch's import chain that cannot load here.

    dalle_pytorch/vae.py imports `taming.models.vqgan` (for its VQGAN wrapper, which the
    benchmark never builds); that module imports pytorch_lightning and taming.main, which
    need torchvision (removed: its PyPI build is CUDA-only) and an old Lightning API. A
    module with placeholder VQModel / GumbelVQ classes takes its place.
    """
    import types

    module = types.ModuleType("taming.models.vqgan")

    class VQModel:  # noqa: D401 - placeholder
        """Stand-in: dalle_pytorch only refers to it; building it is an error."""

        def __init__(self, *args, **kwargs):
            raise RuntimeError("taming.models.vqgan is a benchmark stand-in; VQGAN is not available")

    class GumbelVQ(VQModel):
        """Stand-in, as VQModel."""

    module.VQModel, module.GumbelVQ = VQModel, GumbelVQ
    sys.modules["taming.models.vqgan"] = module
    return ["taming.models.vqgan (placeholder VQModel, GumbelVQ)"]


def _import_peer():
    import warnings

    stand_ins = register_peer_stand_ins()
    with warnings.catch_warnings():  # its __init__ imports the deprecated pkg_resources
        warnings.simplefilter("ignore")
        import dalle_pytorch
    return dalle_pytorch, stand_ins


def _peer_vae(dalle_pytorch, spec: dict, for_dalle: bool):
    """A DiscreteVAE: tiny and frozen as the DALLE's code source (DALLE reads its image_size,
    num_layers and num_tokens), or sized like ours for the dVAE measurement."""
    if for_dalle:  # one layer: image_size = 2 * grid, so image_seq_len = grid**2
        return dalle_pytorch.DiscreteVAE(image_size=2 * spec["grid"], num_tokens=spec["image_vocab"],
                                         codebook_dim=16, num_layers=1, hidden_dim=16)
    layers = int(math.log2(spec["dvae_image_size"] // spec["grid"]))
    return dalle_pytorch.DiscreteVAE(image_size=spec["dvae_image_size"], num_tokens=spec["image_vocab"],
                                     codebook_dim=512, num_layers=layers, hidden_dim=spec["dvae_hidden"],
                                     num_resnet_blocks=1)


def measure_peer(task: str, spec: dict) -> dict:
    """One measurement of dalle-pytorch's DALLE or DiscreteVAE (run inside .venv-peer)."""
    import torch

    dalle_pytorch, stand_ins = _import_peer()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    load_lazy_libraries()
    mark = reset_peak()
    extra = {"stand_ins": stand_ins, "dalle_pytorch": dalle_pytorch.__version__, "torch": torch.__version__}
    if task == "dvae":
        vae = _peer_vae(dalle_pytorch, spec, for_dalle=False).train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=spec["lr"])
        size = spec["dvae_image_size"]
        images = torch.rand(spec["dvae_batch"], 3, size, size, generator=torch.Generator().manual_seed(spec["seed"]))

        def step():
            loss = vae(images, return_loss=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = _dvae_result(_time_train_steps(step, _dvae_steps(spec)), spec, _params(vae))
        return {**result, **extra, **read_peak(mark)}

    sampling = task in ("sample", "sample_guided")
    optimize_for_inference = sampling and spec["peer_inference"] == "masked"
    vae = _peer_vae(dalle_pytorch, spec, for_dalle=True)
    model = dalle_pytorch.DALLE(
        dim=spec["dim"], vae=vae, num_text_tokens=spec["text_vocab"], text_seq_len=spec["text_len"],
        depth=spec["depth"], heads=spec["heads"], dim_head=spec["dim_head"],
        attn_types=tuple(PEER_ATTN[p] for p in spec["attention"]),
        optimize_for_inference=optimize_for_inference)
    params = _params(model) - _params(vae)  # the frozen VAE is not part of the transformer
    extra["optimize_for_inference"] = optimize_for_inference
    if task in ("train", "train_bf16"):
        text, codes = _inputs(spec, spec["train_batch"])
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])

        def step():
            with _autocast(task):
                loss = model(text, codes, return_loss=True)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        result = _train_result(_time_train_steps(step, spec), spec, params)
        return {**result, **extra, **read_peak(mark)}

    vae.decode = lambda codes: codes  # see PEER_NOTES: ours returns codes, not pixels
    text, codes = _inputs(spec, spec["sample_batch"])
    model.eval()
    with torch.no_grad():  # warm-up: one pass over the whole stream, as for ours
        model(text.clone(), codes)
    cond_scale = spec["cond_scale"] if task == "sample_guided" else 1.0
    state = {"calls": 0}
    # generate_images calls self.forward_with_cond_scale once per token; the instance
    # attribute shadows the method.
    model.forward_with_cond_scale = _budgeted(model.forward_with_cond_scale, spec, state)

    def run():
        out = model.generate_images(text.clone(), filter_thres=0.5, cond_scale=cond_scale, use_cache=True)
        assert tuple(out.shape) == (spec["sample_batch"], spec["image_len"]), out.shape

    result = _run_sampling(run, spec, state, tokens_per_call_offset=0)
    # use_cache only reaches the model through forward_with_cond_scale when cond_scale != 1.
    extra["use_cache"] = True
    extra["cache_effective"] = cond_scale != 1.0
    return {**result, "params": params, **extra, **read_peak(mark)}


def worker(side: str, task: str, spec: dict) -> None:
    """Runs one measurement and prints its result as one JSON line."""
    try:
        result = (measure_ours if side == "ours" else measure_peer)(task, spec)
    except Exception as error:  # reported, not raised: the other side's figures still count
        result = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    print(json.dumps(result))


# ----------------------------------------------------------------------------- orchestration


def peer_python(args: argparse.Namespace) -> Path:
    return Path(args.peer_python) if args.peer_python else ROOT / ".venv-peer" / "bin" / "python"


def run_worker(side: str, task: str, spec: dict, args: argparse.Namespace) -> dict:
    """One measurement in a fresh subprocess; returns its JSON (or an error entry)."""
    env = dict(os.environ)
    if side == "ours":
        python = args.ours_python or sys.executable
        env["PYTHONPATH"] = str(Path(args.ours_root).resolve())
    else:
        python = str(peer_python(args))
        env.pop("PYTHONPATH", None)  # the peer's interpreter must not see our package
    command = [python, str(Path(__file__).resolve()), "--worker", side, "--task", task, "--spec", json.dumps(spec)]
    for attempt in range(2):  # a worker killed by a signal from outside gets one more try
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.worker_timeout,
                                  cwd=str(ROOT) if side == "peer" else None)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.worker_timeout} s"}
        except OSError as error:
            return {"error": f"{type(error).__name__}: {error}"}
        if done.returncode >= 0:
            break
        print(f"[bench] {task} {side}: killed by signal {-done.returncode}, attempt {attempt + 1}",
              file=sys.stderr, flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:500]}"}
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if attempt:
        result["attempts"] = attempt + 1
    return result


def probe_peer_imports(args: argparse.Namespace) -> dict:
    """Why the stand-ins are needed: the real imports' first error, from the peer's venv."""
    python = peer_python(args)
    if not python.exists():
        return {"error": f"{python} is missing: run bash scripts/setup_peer.sh"}
    found = {}
    for module in ("taming.models.vqgan", "torchvision"):
        done = subprocess.run([str(python), "-W", "ignore", "-c", f"import {module}"], capture_output=True,
                              text=True, timeout=300, cwd=str(ROOT))
        errors = [line for line in done.stderr.splitlines() if "Error" in line]
        found[module] = "imports" if done.returncode == 0 else (errors[-1] if errors else f"exit {done.returncode}")
    return found


def best(results: list[dict], key: str, pick=max) -> float | None:
    values = [r[key] for r in results if key in r]
    return pick(values) if values else None


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def spread(values: list[float]) -> float | None:
    """(max - min) / median of the repeats: how far one run may be from another."""
    return round((max(values) - min(values)) / median(values), 3) if len(values) > 1 and median(values) else None


def summarise(raw: list[dict], spec: dict, host: dict | None = None) -> dict:
    """Median-of-repeats throughput (with its spread) and memory per side and task, and the
    ours / peer ratios."""
    figures: dict[str, dict] = {side: {} for side in SIDES}
    for task in TASKS:
        for side in SIDES:
            runs = [r["result"] for r in raw if r["side"] == side and r["task"] == task]
            if not runs:
                continue
            key = "images_per_s" if task == "dvae" else "tokens_per_s"
            values = [r[key] for r in runs if key in r]
            entry = {key: median(values) if values else None, "spread": spread(values) if values else None,
                     "runs": values, "workload_mib": best(runs, "workload_mib", median),
                     "peak_rss_mib": best(runs, "peak_rss_mib"), "params": best(runs, "params")}
            if any("model_gflops" in r for r in runs):
                entry["model_gflops"] = round(median([r["model_gflops"] for r in runs if "model_gflops" in r]), 2)
            if any("peak_fraction" in r for r in runs):
                entry["peak_fraction"] = round(median([r["peak_fraction"] for r in runs if "peak_fraction" in r]), 3)
            if any(r.get("partial") for r in runs):
                entry["partial"] = True
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                entry["error"] = errors[0]
            figures[side][task] = entry

    def ratio(task: str, key: str) -> float | None:
        ours = figures["ours"].get(task, {}).get(key)
        peer = figures["peer"].get(task, {}).get(key)
        return round(ours / peer, 3) if ours is not None and peer else None

    def transformer_memory(side: str) -> float | None:
        values = [figures[side][t]["workload_mib"] for t in ("train", "sample", "sample_guided")
                  if figures[side].get(t, {}).get("workload_mib") is not None]
        return max(values) if values else None

    ours_mem, peer_mem = transformer_memory("ours"), transformer_memory("peer")
    achieved = figures["ours"].get("train", {}).get("model_gflops")
    peak = (host or {}).get("fp32_gflops")
    fraction = figures["ours"].get("train", {}).get("peak_fraction")  # against the peak of the moment
    if fraction is None and achieved and peak:  # workers that did not measure it: the start's peak
        fraction = round(achieved / peak, 3)
    return {
        "sampling_ratio": ratio("sample", "tokens_per_s"),
        "sampling_guided_ratio": ratio("sample_guided", "tokens_per_s"),
        "training_ratio": ratio("train", "tokens_per_s"),
        "memory_ratio": round(ours_mem / peer_mem, 3) if ours_mem is not None and peer_mem else None,
        "memory_ratio_train": ratio("train", "workload_mib"),
        "memory_ratio_sample": ratio("sample", "workload_mib"),
        "dvae_ratio": ratio("dvae", "images_per_s"),
        "dvae_memory_ratio": ratio("dvae", "workload_mib"),
        "training_peak_fraction": fraction,
        "training_ratio_bf16": ratio("train_bf16", "tokens_per_s"),
        "ours": figures["ours"], "peer": figures["peer"],
    }


def markdown(summary: dict, spec: dict) -> str:
    rows = [("transformer training, tokens/s", "train", "tokens_per_s"),
            ("transformer training under bf16 autocast, tokens/s", "train_bf16", "tokens_per_s"),
            (f"sampling batch {spec['sample_batch']}, image tokens/s", "sample", "tokens_per_s"),
            (f"sampling with guidance (scale {spec['cond_scale']}), image tokens/s", "sample_guided", "tokens_per_s"),
            ("dVAE training, images/s", "dvae", "images_per_s"),
            ("peak memory, training (MiB over base)", "train", "workload_mib"),
            ("peak memory, sampling (MiB over base)", "sample", "workload_mib"),
            ("peak memory, guided sampling (MiB over base)", "sample_guided", "workload_mib"),
            ("peak memory, dVAE (MiB over base)", "dvae", "workload_mib"),
            ("transformer parameters", "train", "params"),
            ("dVAE parameters", "dvae", "params")]
    lines = ["| measure | ours | dalle-pytorch 1.6.6 | ours / peer |", "| --- | ---: | ---: | ---: |"]
    for label, task, key in rows:
        ours = summary["ours"].get(task, {})
        peer = summary["peer"].get(task, {})
        if not ours and not peer:
            continue
        a, b = ours.get(key), peer.get(key)
        r = f"{a / b:.2f}x" if a is not None and b else "-"
        spread_shown = key.endswith("_per_s")
        lines.append(f"| {label} | {_cell(a, ours, spread_shown)} | {_cell(b, peer, spread_shown)} | {r} |")
    return "\n".join(lines)


def _cell(value, entry: dict, with_spread: bool = False) -> str:
    if value is None:
        return "error" if entry.get("error") else "-"
    text = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
    if with_spread and entry.get("spread") is not None:
        text += f" ±{100 * entry['spread'] / 2:.0f}%"
    return text + (" (partial)" if entry.get("partial") else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = parser.add_argument_group("the shared configuration")
    size.add_argument("--dim", type=int, default=128)
    size.add_argument("--depth", type=int, default=4)
    size.add_argument("--heads", type=int, default=4)
    size.add_argument("--text-len", type=int, default=24)
    size.add_argument("--text-vocab", type=int, default=512, help="BPE vocabulary, without the padding ids")
    size.add_argument("--image-vocab", type=int, default=512)
    size.add_argument("--grid", type=int, default=16, help="image grid side (a power of 2); grid**2 image tokens")
    size.add_argument("--ours-mlp-ratio", type=int, default=6,
                      help="our MLP width / dim; 6 matches the parameters of the peer's GEGLU (mult 4)")
    size.add_argument("--dvae-image-size", type=int, default=64)
    size.add_argument("--dvae-hidden", type=int, default=64)
    size.add_argument("--dvae-layout", choices=("openai", "light"), default="light",
                      help="our dVAE's layout (dvae.layout; light is DVAEConfig's default)")
    work = parser.add_argument_group("the measurements")
    work.add_argument("--train-batch", type=int, default=8)
    work.add_argument("--train-steps", type=int, default=20, help="timed steps per training measurement")
    work.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    work.add_argument("--peak-pairs", type=int, default=10,
                      help="(training step, fp32 matmul) pairs timed after the training steps, for the peak fraction")
    work.add_argument("--sample-batch", type=int, default=8)
    work.add_argument("--cond-scale", type=float, default=3.0)
    work.add_argument("--sample-min-seconds", type=float, default=10,
                      help="sampling runs are repeated until this long has passed, then averaged")
    work.add_argument("--sample-budget", type=float, default=60,
                      help="seconds one sampling run may take; a slower run reports its partial rate")
    work.add_argument("--dvae-batch", type=int, default=8)
    work.add_argument("--dvae-steps", type=int, default=50,
                      help="timed dVAE steps per measurement (20, about 4 s, moved the ratio by 14%%)")
    work.add_argument("--peer-inference", choices=("sparse", "masked"), default="masked",
                      help="peer's sampling model: its sparse layers, or optimize_for_inference=True "
                           "(dense masked attention that its cache can hold)")
    work.add_argument("--repeats", type=int, default=3, help="rounds of (ours, peer) per measurement")
    work.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                      help="train_bf16 runs only where the host's CPU has bf16 units")
    work.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    work.add_argument("--threads", type=int, default=1,
                      help="torch threads on both sides; 1 is steady on a shared 2-core machine, where a "
                           "second thread waits on a descheduled core at every op")
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--worker-timeout", type=int, default=1800)
    where = parser.add_argument_group("the interpreters")
    where.add_argument("--ours-root", default=str(ROOT), help="directory holding our `dalle` package")
    where.add_argument("--ours-python", default=None, help="default: this interpreter")
    where.add_argument("--peer-python", default=None, help="default: .venv-peer/bin/python")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=TASKS + ("host",), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.task, json.loads(args.spec))
        return
    spec = make_spec(args)
    started = time.perf_counter()
    load_start = os.getloadavg()
    peer_imports = probe_peer_imports(args) if "peer" in args.sides else {}
    host = run_worker("ours", "host", spec, args)
    print(f"[bench] host at {spec['threads']} thread(s): {json.dumps(host)}", file=sys.stderr, flush=True)
    tasks = [t for t in args.tasks if t != "train_bf16" or host.get("prefers_bf16")]
    raw = []
    # Interleaved: for each repeat and task, ours then peer, each in a fresh process.
    for repeat in range(args.repeats):
        for task in tasks:
            for side in args.sides:
                result = run_worker(side, task, spec, args)
                raw.append({"repeat": repeat, "task": task, "side": side, "result": result})
                shown = {k: v for k, v in result.items() if k in ("tokens_per_s", "images_per_s", "seconds", "step_s",
                                                                    "workload_mib", "partial", "error")}
                print(f"[bench] {task:>13} {side:>4} #{repeat}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    summary = summarise(raw, spec, host)
    load = {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count()}
    print(markdown(summary, spec))
    print()
    print(f"Threads: {spec['threads']} on both sides; throughput is the median of {args.repeats} run(s) "
          f"(± half their spread), memory the median too; peak memory = resident high-water mark over the "
          f"post-import base (see the module doc).")
    if "fp32_gflops" in host:
        achieved = summary["ours"].get("train", {}).get("model_gflops")
        print(f"Host: a 2048 x 2048 fp32 matmul runs at {host['fp32_gflops']} GFLOP/s, a bf16 one at "
              f"{host['bf16_gflops']} GFLOP/s at the start; our training step does {achieved} GFLOP/s of model "
              f"math, {summary['training_peak_fraction']} of the fp32 peak (steps paired with matmuls, median "
              f"of the repeats). Precision rule: "
              f"{'bf16 (faster here)' if host['prefers_bf16'] else 'fp32 (bf16 is not faster here)'}"
              f"{'' if host['prefers_bf16'] else ', so train_bf16 was not run'}.")
    if max(load["start"][0], load["end"][0]) > (os.cpu_count() or 1):
        # Measured here: with 2 threads on 2 busy cores, a decode step (many small ops) waits
        # on a descheduled thread at every op, and the same sampling run varied 4-20x.
        print(f"Warning: load average {load['start'][0]} at the start, {load['end'][0]} at the end on "
              f"{load['cpus']} CPUs: other processes shared the cores, figures are noisy; "
              "--threads 1 is steadier on a busy machine.")
    if "peer" in args.sides:
        print("Peer stand-ins: taming.models.vqgan (real import: "
              f"{peer_imports.get('taming.models.vqgan', '?')}).")
    keys = ("sampling_ratio", "sampling_guided_ratio", "training_ratio", "memory_ratio", "memory_ratio_train",
            "memory_ratio_sample", "dvae_ratio", "dvae_memory_ratio", "training_peak_fraction")
    out = {**{k: summary[k] for k in keys},
           **({"training_ratio_bf16": summary["training_ratio_bf16"]} if host.get("prefers_bf16") else {}),
           "host": host, "ours": summary["ours"], "peer": summary["peer"], "config": spec,
           "peer_imports": peer_imports, "peer_notes": PEER_NOTES, "load_average": load, "raw": raw,
           "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
