"""scripts/bench.py without the peer: configuration, memory probe, summary and output."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_layout_matches_the_paper(bench):
    assert bench.paper_layout(4) == ["row", "row", "column", "conv"]
    assert bench.paper_layout(8) == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    from dalle.models import masks
    for depth in (1, 4, 7, 12):
        assert bench.paper_layout(depth) == masks.layer_patterns(["paper"], depth)


def test_spec_rejects_what_the_peer_cannot_build(bench):
    with pytest.raises(SystemExit):
        bench.make_spec(bench.parse_args(["--grid", "12"]))
    spec = bench.make_spec(bench.parse_args(["--grid", "8", "--depth", "4"]))
    assert spec["image_len"] == 64 and spec["dim_head"] * spec["heads"] == spec["dim"]
    assert all(pattern in bench.PEER_ATTN for pattern in spec["attention"])


def test_peak_memory_sees_a_fresh_allocation(bench):
    mark = bench.reset_peak()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page
    peak = bench.read_peak(mark)
    del block
    assert peak["workload_mib"] >= 60
    assert peak["peak_rss_mib"] >= peak["base_rss_mib"]


def fake_raw():
    def run(side, task, repeat, **result):
        return {"side": side, "task": task, "repeat": repeat, "result": result}

    return [
        run("ours", "train", 0, tokens_per_s=300.0, workload_mib=50.0, params=10),
        run("peer", "train", 0, tokens_per_s=100.0, workload_mib=100.0, params=10),
        run("ours", "train", 1, tokens_per_s=200.0, workload_mib=60.0, params=10),
        run("peer", "train", 1, tokens_per_s=150.0, workload_mib=90.0, params=10),
        run("ours", "sample", 0, tokens_per_s=400.0, workload_mib=20.0),
        run("peer", "sample", 0, tokens_per_s=10.0, workload_mib=40.0, partial=True),
        run("ours", "sample_guided", 0, error="boom"),
        run("peer", "sample_guided", 0, tokens_per_s=5.0, workload_mib=45.0),
    ]


def test_summary_takes_median_throughput_and_memory(bench):
    summary = bench.summarise(fake_raw(), {}, {"fp32_gflops": 100.0})
    assert summary["training_ratio"] == 2.0  # median 250 over median 125
    assert summary["ours"]["train"]["spread"] == 0.4  # (300 - 200) / 250
    assert summary["sampling_ratio"] == 40.0
    assert summary["sampling_guided_ratio"] is None
    assert summary["ours"]["sample_guided"]["error"] == "boom"
    assert summary["peer"]["sample"]["partial"] is True
    assert summary["memory_ratio_train"] == 0.579  # median 55 over median 95
    assert summary["memory_ratio"] == 0.579  # ours max(55, 20) over peer max(95, 40, 45)
    assert summary["dvae_ratio"] is None and summary["training_ratio_bf16"] is None
    assert summary["training_peak_fraction"] is None  # no model_gflops in the fake runs


def test_median_of_three_and_peak_fraction(bench):
    raw = [{"side": "ours", "task": "train", "repeat": i, "result": {"tokens_per_s": v, "model_gflops": g}}
           for i, (v, g) in enumerate([(10.0, 50.0), (30.0, 70.0), (20.0, 60.0)])]
    summary = bench.summarise(raw, {}, {"fp32_gflops": 100.0})
    assert summary["ours"]["train"]["tokens_per_s"] == 20.0
    assert summary["training_peak_fraction"] == 0.6
    # Runs that measured the host's peak beside their steps: the median of their own fractions,
    # not the start's peak (here 100 GFLOP/s, which would say 0.6).
    for run, fraction in zip(raw, [0.5, 0.9, 0.7], strict=True):
        run["result"]["peak_fraction"] = fraction
    assert bench.summarise(raw, {}, {"fp32_gflops": 100.0})["training_peak_fraction"] == 0.7


def test_paired_peak_fraction_of_a_step_that_is_the_peak_matmul(bench):
    import torch

    a = torch.randn(2048, 2048)
    result = bench.paired_peak_fraction(lambda: torch.mm(a, a), 2 * 2048**3, pairs=3)
    # A "step" that is the peak's own matmul runs at the peak: the fraction is near 1.
    assert 0.6 < result["peak_fraction"] < 1.6, result
    assert result["host_fp32_gflops"] > 0 and result["peak_fraction_spread"] is not None
    tiny = bench.paired_peak_fraction(lambda: None, 1.0, pairs=2)  # one FLOP per step: far below the peak
    assert tiny["peak_fraction"] < 0.01


def test_model_flops_count_the_blocks_and_dense_attention(bench):
    from dalle.config import TransformerConfig
    from dalle.models.transformer import DalleTransformer

    spec = bench.make_spec(bench.parse_args(["--dim", "32", "--depth", "2", "--heads", "2", "--grid", "4"]))
    config = TransformerConfig(dim=32, depth=2, heads=2, mlp_ratio=spec["ours_mlp_ratio"], attention=["causal"],
                               text_len=spec["text_len"], text_vocab=spec["text_vocab"] + spec["text_len"],
                               image_vocab=spec["image_vocab"], image_grid=4)
    model = DalleTransformer(config)
    blocks = sum(p.numel() for p in model.blocks.parameters()) + sum(p.numel() for p in model.ln_f.parameters())
    head = model.image_head.weight.numel()
    attention = 12 * 2 * 32 * (spec["text_len"] + 16)
    assert bench.model_flops_per_token(model, spec) == 6 * (blocks + head) + attention


def test_markdown_marks_partial_and_failed_cells(bench):
    spec = bench.make_spec(bench.parse_args([]))
    table = bench.markdown(bench.summarise(fake_raw(), spec), spec)
    assert "| transformer training, tokens/s | 250.0 ±20% | 125.0 ±20% | 2.00x |" in table
    assert "10.0 (partial)" in table
    assert "| error | 5.0 | - |" in table
    json.dumps(bench.summarise(fake_raw(), spec))  # the last line must serialise


def test_gpu_benchmark_dry_run_on_cpu(capsys):
    """scripts/bench_gpu.py --tiny runs the GPU checks' code on the CPU and ends with JSON."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--no-compile"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["correctness"]["flex_vs_sdpa_max_abs_diff"] < 1e-4
    assert result["decode"]["image_tokens"] == 64 and result["decode"]["image_tokens_per_s"] > 0
    assert result["decode_eager"]["compile_step"] is False


def test_sampling_repeats_fast_runs_and_reports_a_slow_one_as_partial(bench):
    spec = {"sample_min_seconds": 0.05, "sample_budget": 10.0, "sample_batch": 2, "image_len": 4}
    state = {"calls": 0}
    fast = bench._run_sampling(lambda: time.sleep(0.01), spec, state, tokens_per_call_offset=0)
    assert fast["runs"] >= 5 and "partial" not in fast
    assert abs(fast["tokens_per_s"] - fast["runs"] * 8 / fast["seconds"]) < 1e-9

    slow_state = {"calls": 0}

    def over_budget():  # one token made, then the budget is spent
        slow_state["calls"] += 1
        raise bench._OverBudget

    slow = bench._run_sampling(over_budget, spec, slow_state, tokens_per_call_offset=0)
    assert slow["partial"] is True and slow["tokens_done"] == 1 and slow["tokens_wanted"] == 4
