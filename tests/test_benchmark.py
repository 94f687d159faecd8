"""scripts/benchmark.py (`make bench`): the report's sections and arithmetic at tiny sizes, the
bare loop it compares Lightning against (same weights from the same seed and batches), the FLOP
count behind MFU and the memory tracker, checked against hand counts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scripts import benchmark as bench
from vqa.models.head import MLPHead
from vqa.train import build_components
from vqa.utils.project import CONFIG_DIR


def tiny_cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    return bench.compose_config(
        [*bench.TINY, f"paths.data_dir={data_dir}", *overrides], tmp_path / "run"
    )


@pytest.fixture
def quick_report(tmp_path: Path, shared_data_dir: Path) -> tuple[dict, str, list[str]]:
    # the quick-start's own fusion (the pipeline section's) and a cheap one
    default = bench.describe(bench.compose_config(bench.TINY, tmp_path / "cfg"))["fusion"]
    fusions = sorted({default, "late"})
    out = tmp_path / "bench"
    report = bench.main(
        [
            "--quick",
            "--gpu-smoke",
            "--threads",
            "1",
            "--fusions",
            *fusions,
            "--out",
            str(out),
            "--data-dir",
            str(shared_data_dir),
        ]
    )
    written = json.loads((out / "benchmark.json").read_text())
    assert written["meta"]["threads"] == report["meta"]["threads"] == 1
    return written, (out / "benchmark.md").read_text(), fusions


def test_quick_report_has_every_section_and_consistent_ratios(quick_report) -> None:
    report, md, fusions_run = quick_report
    assert set(bench.SECTIONS) <= set(report)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in md

    fusions = report["fusions"]["rows"]
    assert {(r["fusion"], r["path"]) for r in fusions} == {
        (f, p) for f in fusions_run for p in ("images", "cached")
    }
    for r in fusions:
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mib"] > 0
        # the cached rows train with the encoder frozen and skipped, the image rows train it
        assert r["visual_frozen"] == (r["path"] == "cached")
    for fusion in fusions_run:
        by_path = {r["path"]: r for r in fusions if r["fusion"] == fusion}
        assert by_path["cached"]["trainable_params"] < by_path["images"]["trainable_params"]
        assert by_path["cached"]["peak_memory_mib"] < by_path["images"]["peak_memory_mib"]

    overhead = report["overhead"]
    assert overhead["lightning_samples_per_s"] > 0 and overhead["bare_samples_per_s"] > 0
    assert overhead["ratio"] == pytest.approx(
        overhead["lightning_samples_per_s"] / overhead["bare_samples_per_s"], rel=1e-12
    )
    kinds = [r["kind"] for r in overhead["runs"]]
    assert kinds == ["lightning", "bare", "bare", "lightning"]  # interleaved, ABBA
    assert f"{overhead['ratio']:.3f}" in md

    pipeline = report["pipeline"]
    assert pipeline["fusion"] in fusions_run and pipeline["model_runs"] == []  # reuses section 1
    model_rate = {
        r["path"]: r["samples_per_s"] for r in fusions if r["fusion"] == pipeline["fusion"]
    }
    assert [r["path"] for r in pipeline["rows"]] == ["images", "cached"]
    for r in pipeline["rows"]:
        assert r["loader_samples_per_s"] > 0
        assert r["model_samples_per_s"] == model_rate[r["path"]]
        assert r["ratio"] == pytest.approx(
            r["loader_samples_per_s"] / r["model_samples_per_s"], rel=1e-12
        )

    scaling = report["scaling"]["rows"]
    settings = {(s["grid"], s["length"]) for s in report["scaling"]["settings"]}
    assert settings == {(2, 4), (4, 4), (2, 8)}
    variants = {(r["fusion"], r["attention"]) for r in scaling}
    for fusion in fusions_run:  # blocks with a top_k option run dense and top-k, others once
        if "top_k" in OmegaConf.load(CONFIG_DIR / "fusion" / f"{fusion}.yaml"):
            assert {(fusion, "dense"), (fusion, "top-2")} <= variants
        else:
            assert (fusion, "no top_k option") in variants
    assert len(scaling) == len(variants) * len(settings)
    for r in scaling:
        assert r["ms"] > 0 and r["memory_mib"] > 0
    # activations grow with the grid
    for fusion, attention in variants:
        mem = {
            (r["grid"], r["length"]): r["memory_mib"]
            for r in scaling
            if (r["fusion"], r["attention"]) == (fusion, attention)
        }
        assert mem[(4, 4)] > mem[(2, 4)]

    gpu = report["gpu"]
    assert gpu["smoke"] and gpu["device"] != "cuda"
    assert gpu["precision"] == "bf16-mixed" and gpu["channels_last"]
    # The head alone does 6 * B * (in*h + h*A) FLOPs per training step: the model does more.
    head = 6 * gpu["batch_questions"] * (64 * 32 + 32 * 16)  # parallel out_dim 2*32, hidden 32
    assert gpu["flops_per_step"] > head
    for kind in ("bare", "lightning"):
        assert gpu[kind]["samples_per_s"] > 0
        assert gpu[kind]["mfu"] is None  # no peak for a CPU
        assert gpu[kind]["achieved_tflops"] == pytest.approx(
            gpu["flops_per_step"] / (gpu[kind]["step_ms"] / 1000) / 1e12, rel=1e-9
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip message is for CPU-only machines")
def test_gpu_section_skips_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    report = bench.main(["--quick", "--sections", "gpu", "--threads", "1", "--out", str(out)])
    assert report["gpu"] == {"skipped": "no CUDA"}
    assert json.loads((out / "benchmark.json").read_text())["gpu"] == {"skipped": "no CUDA"}
    assert "skipped: no CUDA" in (out / "benchmark.md").read_text()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bare_loop_ends_with_the_weights_of_the_lightning_run(
    tmp_path: Path, shared_data_dir: Path, precision: str
) -> None:
    """The overhead section's A/B is apples to apples: from the same weights, seed and batches,
    trainer.fit (project trainer config: clip 5.0, callbacks, CSV logger) and the bare loop
    (modality dropout, dropout, loss, AdamW groups, clipping, cosine schedule) agree."""
    cfg = tiny_cfg(tmp_path, shared_data_dir, f"trainer.precision={precision}")
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build_components(cfg)
    batches = bench.collect_batches(datamodule, 5)
    initial = copy.deepcopy(module.state_dict())

    torch.manual_seed(7)
    bench.lightning_fit(cfg, module, batches, tmp_path / "lightning")
    lightning = copy.deepcopy(module.state_dict())
    assert (tmp_path / "lightning" / "checkpoints" / "last.ckpt").is_file()

    def bare(seed: int) -> dict[str, torch.Tensor]:
        module.load_state_dict(initial)
        torch.manual_seed(seed)
        bench.bare_fit(
            module,
            batches,
            clip_val=cfg.trainer.gradient_clip_val,
            precision=cfg.trainer.precision,
            device=torch.device("cpu"),
        )
        return copy.deepcopy(module.state_dict())

    same = bare(7)
    # the network's weights and buffers (the metrics' running states are the module's own)
    weights = [k for k in initial if k.startswith("net.")]
    trained = [k for k in weights if initial[k].is_floating_point() and initial[k].numel() > 1]
    assert any(not torch.equal(initial[k], lightning[k]) for k in trained)
    for key in weights:  # bit for bit: same kernels in the same order
        torch.testing.assert_close(same[key], lightning[key], rtol=0, atol=0, msg=key)
    # The comparison can fail: another seed draws other modality and dropout masks.
    other = bare(8)
    assert any(not torch.allclose(other[k], lightning[k]) for k in trained)


def test_flop_count_matches_the_analytic_count_of_the_answer_head() -> None:
    batch, width, hidden, answers = 5, 24, 16, 40
    head = MLPHead(width, answers, hidden_dim=hidden, dropout=0.0)
    features = torch.randn(batch, width, requires_grad=True)

    flops = bench.count_flops(lambda: head(features).sum().backward())
    # two Linear layers: forward 2*B*in*out each; backward the same twice (input and weight grads)
    assert flops == 6 * batch * (width * hidden + hidden * answers)


def test_flop_count_sees_cpu_fused_attention() -> None:
    """BERT's attention on CPU runs a fused kernel torch's registry does not know (counted 0);
    the benchmark maps it onto torch's attention formulas."""
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5) > 0.3

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

    plain = FlopCounterMode(display=False)
    with plain:
        step()
    assert plain.get_total_flops() == 0
    # forward: Q K^T and P V, 2*B*H*L*S*D each; backward: 5 such products (recomputed scores,
    # dV, dP, dQ, dK)
    product = 2 * 2 * 3 * 5 * 5 * 8
    assert bench.count_flops(step) == 7 * product


def test_memory_tracker_counts_live_storages_at_their_peak() -> None:
    params = nn.Linear(100, 10)
    with bench.TensorMemoryTracker(bench.state_tensors(params)) as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.zeros(2000)  # + 8000
        view = b[:10]  # a view allocates nothing
        del a  # - 4000
        c = torch.ones(500)  # + 2000: below the peak
        del b, view, c
    start = (100 * 10 + 10) * 4
    assert tracker.start == start
    assert tracker.peak == start + 12000
    assert tracker.increase == 12000
    assert tracker.live == start


@pytest.mark.slow
def test_isolated_run_reports_its_own_peak_rss(tmp_path: Path, shared_data_dir: Path) -> None:
    """A fresh forkserver child per configuration: ru_maxrss is that configuration's peak."""
    tiny_cfg(tmp_path, shared_data_dir)  # generates the tiny set in the shared folder
    spec = {
        "overrides": [*bench.TINY, f"paths.data_dir={shared_data_dir}", "fusion=late"],
        "threads": 1,
        "device": "cpu",
        "warmup": 1,
        "steps": 1,
    }
    (result,) = bench.run_specs([spec], isolate=True)
    assert result["samples_per_s"] > 0
    assert result["peak_rss_mib"] >= result["rss_increase_mib"] > 0
