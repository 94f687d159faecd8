"""scripts/benchmark.py (`make bench`): the report's sections and arithmetic at tiny sizes, the
bare loop it compares Lightning against (same weights from the same seed and batches), the FLOP
count behind MFU, the memory tracker and the op/sync counts, checked against hand counts."""

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

from scripts.bench import cli
from scripts.bench.common import (
    GPU_ROWS,
    SECTIONS,
    TINY,
    TensorMemoryTracker,
    bare_fit,
    collect_batches,
    compose_config,
    describe,
    in_memory_loader,
    lightning_fit,
    make_sizes,
    state_tensors,
)
from scripts.bench.fusions import run_specs
from scripts.bench.gpu import count_flops, fit_line
from scripts.bench.latency import GOAL_MODEL, PACKED_ROW
from scripts.bench.ops import OpsWindow, count_phases, ops_summary
from scripts.bench.report import _f, _n
from tests.helpers import ROOT
from vqa.cli.train import build_components
from vqa.models.head import MLPHead
from vqa.utils.op_counter import count_ops
from vqa.utils.project import CONFIG_DIR


def tiny_cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    return compose_config([*TINY, f"paths.data_dir={data_dir}", *overrides], tmp_path / "run")


@pytest.fixture
def quick_report(tmp_path: Path, shared_data_dir: Path) -> tuple[dict, str, list[str]]:
    # the quick-start's own fusion (the pipeline section's) and a cheap one
    default = describe(compose_config(TINY, tmp_path / "cfg"))["fusion"]
    fusions = sorted({default, "late"})
    out = tmp_path / "bench"
    report = cli.main(
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
    assert set(SECTIONS) <= set(report)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
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

    check_jpeg_loader(pipeline["jpeg"], md)

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

    check_gpu_smoke(report["gpu"], md)
    check_ops(report["ops"], md, fusions_run, report["meta"]["quickstart"]["fusion"])


def check_jpeg_loader(jpeg: dict, md: str) -> None:
    """The data=vqav2 loader rows on COCO-sized JPEGs, and an extrapolation that is exactly its
    formula of the measured values."""
    data = jpeg["data_set"]
    assert (data["images"], data["width"], data["height"]) == (16, 640, 480)
    assert data["questions"] == 16 * 5
    # photo-like content: flat shapes alone would compress to a fraction of this
    assert data["jpeg_kib_mean"] > 60
    assert jpeg["image_size"] == 448 and jpeg["batch_size"] == 64 and jpeg["group_by_image"]
    rows = jpeg["rows"]
    assert [r["num_workers"] for r in rows] == [1, 2]
    for r in rows:
        assert r["questions"] == data["questions"] * r["epochs"]  # each question once an epoch
        assert r["images"] >= data["images"] * r["epochs"]  # straddling images decode twice
        assert r["questions_per_s"] == pytest.approx(r["questions"] / r["seconds"], rel=1e-12)
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"], rel=1e-12)
        assert r["images_per_s_per_worker"] == pytest.approx(
            r["images_per_s"] / r["num_workers"], rel=1e-12
        )
        assert r["startup_s"] > 0 and r["questions_per_s"] > r["images_per_s"] > 0
    assert min(jpeg["stages_ms"].values()) > 0
    assert jpeg["in_process_images_per_s"] == pytest.approx(
        1000 / jpeg["stages_ms"]["dataset_image"], rel=1e-12
    )
    assert jpeg["one_worker_ms_per_image"] == pytest.approx(
        1000 / rows[0]["images_per_s"], rel=1e-12
    )

    x = jpeg["extrapolation"]
    per_worker = rows[0]["images_per_s"]
    assert x["per_worker_images_per_s"] == per_worker
    assert (x["workers"], x["questions_per_image"], x["goal_questions_per_s"]) == (16, 5.4, 3000)
    assert x["questions_per_s"] == pytest.approx(per_worker * 16 * 5.4, rel=1e-12)
    assert x["clears_goal"] == (x["questions_per_s"] >= 3000)
    recipe = OmegaConf.load(ROOT / "configs" / "experiment" / "vqav2_resnet101_bert.yaml")
    assert x["recipe_workers"] == recipe.data.num_workers
    assert x["recipe_workers_questions_per_s"] == pytest.approx(
        per_worker * recipe.data.num_workers * 5.4, rel=1e-12
    )
    slowest = min(r["images_per_s_per_worker"] for r in rows)
    assert x["slowest_row_questions_per_s"] == pytest.approx(slowest * 16 * 5.4, rel=1e-12)
    assert x["slowest_row_questions_per_s"] <= x["questions_per_s"]
    assert x["from_row_questions_per_s"] == pytest.approx(
        rows[0]["questions_per_s"] * 16, rel=1e-12
    )
    assert x["in_process_questions_per_s"] == pytest.approx(
        jpeg["in_process_images_per_s"] * 16 * 5.4, rel=1e-12
    )
    assert "**Extrapolation, not a measurement:**" in md
    assert f"**{_f(x['questions_per_s'], 0)} questions/s**" in md
    for r in rows:
        assert f"| {r['num_workers']} | {_f(r['startup_s'], 2)} |" in md


def check_gpu_smoke(gpu: dict, md: str) -> None:
    assert gpu["smoke"] and gpu["device"] != "cuda"
    assert gpu["precision"] == "bf16-mixed" and gpu["channels_last"]
    rows = gpu["rows"]
    assert [r["row"] for r in rows] == [
        *["sweep"] * 3,
        "grouped",
        *["optimizer"] * 2,
        "lightning",
        "anchor",
        "e2e",
        "graphs",
    ]
    timed = [r for r in rows if r["row"] not in ("graphs", "e2e")]
    for r in timed:
        assert r["step_ms"] > 0
        assert r["mfu"] is None  # no peak for a CPU
        assert r["achieved_tflops"] == pytest.approx(
            r["flops_per_step"] / (r["step_ms"] / 1000) / 1e12, rel=1e-9
        )
        if r["row"] != "anchor":
            # The head alone does 6 * B * (in*h + h*A) FLOPs per training step: the model more.
            assert r["flops_per_step"] > 6 * r["questions"] * (64 * 32 + 32 * 16)
            assert r["questions_per_s"] == pytest.approx(r["questions"] / r["step_ms"] * 1000)
    sweep = [r for r in rows if r["row"] == "sweep"]
    assert [(r["images"], r["questions"]) for r in sweep] == [(2, 2), (4, 4), (8, 8)]
    assert sweep[0]["flops_per_step"] < sweep[1]["flops_per_step"] < sweep[2]["flops_per_step"]
    fixed, per_image = fit_line([(r["images"], r["step_ms"]) for r in sweep])
    assert gpu["summary"]["fixed_cost"]["fixed_ms"] == pytest.approx(fixed)
    assert gpu["summary"]["fixed_cost"]["ms_per_image"] == pytest.approx(per_image)
    (grouped,) = [r for r in rows if r["row"] == "grouped"]
    assert (grouped["images"], grouped["questions"]) == (2, 4)

    foreach, fused = (r for r in rows if r["row"] == "optimizer")
    assert "foreach" in foreach["label"] and "fused" in fused["label"]
    # Same model and batch: only the optimizer phase differs, fused in fewer ops and no host
    # reads (the other implementations read each parameter's CPU step count with .item()).
    for phase in ("forward", "backward"):
        assert fused["ops"]["phases"][phase] == foreach["ops"]["phases"][phase] > 0
    assert 0 < fused["ops"]["phases"]["optimizer"] < foreach["ops"]["phases"]["optimizer"]
    assert fused["ops"]["phase_host_syncs"]["optimizer"] == 0

    lightning = next(r for r in rows if r["row"] == "lightning")
    bare = next(r for r in sweep if r["images"] == lightning["images"])
    assert gpu["summary"]["lightning_over_bare"] == pytest.approx(
        lightning["questions_per_s"] / bare["questions_per_s"]
    )
    anchor = next(r for r in rows if r["row"] == "anchor")
    assert anchor["questions"] is None and anchor["flops_per_step"] > 0
    assert "resnet18 alone" in anchor["label"] and "fused" in anchor["label"]

    e2e = next(r for r in rows if r["row"] == "e2e")
    assert "error" not in e2e, e2e.get("log_tail")
    assert e2e["command"].split()[1] == "train.py" and "trainer.max_steps=6" in e2e["command"]
    # tiny set: 8 images x 4 questions, batches of 8 questions = 2 whole images
    assert (e2e["steps_run"], e2e["steps_timed"], e2e["questions"], e2e["images"]) == (6, 3, 8, 2)
    assert e2e["questions_per_s"] == pytest.approx(8 / e2e["step_ms"] * 1000)
    assert e2e["checkpoint"].endswith("checkpoints/last.ckpt")
    (graphs,) = [r for r in rows if r["row"] == "graphs"]
    assert "CUDA" in graphs["skipped"]
    assert "| graphs | eager vs torch.compile" in md and "Fixed cost" in md


def check_ops(ops: dict, md: str, fusions_run: list[str], default: str) -> None:
    expected = [(f, "bare") for f in fusions_run] + [(f, "lightning") for f in fusions_run]
    expected.append((default, "lightning + callbacks, logger"))
    assert sorted((r["fusion"], r["loop"]) for r in ops["rows"]) == sorted(expected)
    for r in ops["rows"]:
        assert r["kernels"] > 0 and min(r["phases"].values()) > 0
        assert sum(r["phases"].values()) == pytest.approx(r["kernels"])
        assert r["host_syncs"] == pytest.approx(
            sum(r["syncs"].values()) + sum(r["host_reads"].values())
        )
        assert sum(r["phase_host_syncs"].values()) == pytest.approx(r["host_syncs"])
        counts = [n for _, n in r["top_ops"]]
        assert len(counts) == 10 and counts == sorted(counts, reverse=True)
        assert counts[0] <= r["kernels"]
        assert f"| {r['fusion']} | {r['loop']} | {_n(r['kernels'])} |" in md
    for fusion in fusions_run:
        by_loop = {r["loop"]: r for r in ops["rows"] if r["fusion"] == fusion}
        # training_step runs what the bare forward runs, plus its metrics and logging
        assert by_loop["lightning"]["phases"]["forward"] > by_loop["bare"]["phases"]["forward"]
    user = next(r for r in ops["rows"] if r["loop"] == "lightning + callbacks, logger")
    assert user["steps_counted"] == 10  # the tiny trainer's log_every_n_steps
    assert "## 6. Kernels and host syncs per training step" in md


def test_ops_summary_counts_phases_and_a_deliberate_host_sync() -> None:
    x = torch.randn(8, 8, requires_grad=True)
    phases = count_phases(
        [("compute", lambda: (x @ x).relu().sum().backward()), ("read", lambda: x.sum().item())]
    )
    summary = ops_summary(phases)
    with count_ops() as read:
        x.sum().item()
    assert summary["phase_host_syncs"] == {"compute": 0, "read": read.host_syncs}
    assert read.host_syncs > 0 and summary["host_syncs"] == read.host_syncs
    assert summary["phases"]["read"] == read.kernels
    assert summary["kernels"] == sum(p.kernels for p in phases.values())
    # averaged over steps
    assert ops_summary(phases, steps=2)["kernels"] == summary["kernels"] / 2


class _Syncing(pl.LightningModule):
    """A training step that reads its loss on the host: the sync the ops section must see."""

    def __init__(self, sync: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.sync = sync

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        if self.sync:
            loss.item()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("sync", [False, True])
def test_ops_window_counts_the_asked_steps_by_phase(tmp_path: Path, sync: bool) -> None:
    counter = OpsWindow(first=1, steps=2)
    trainer = pl.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
        default_root_dir=tmp_path,
    )
    batches = [torch.randn(2, 4) for _ in range(4)]
    trainer.fit(_Syncing(sync), train_dataloaders=in_memory_loader(batches))
    phases = [phase for phase, _ in counter.records]
    assert phases == ["forward", "backward", "optimizer"] * 2
    summary = ops_summary(counter.phases, steps=2)
    assert summary["phases"]["backward"] > 0 and summary["phases"]["optimizer"] > 0
    # .item() in training_step: one host read and its _local_scalar_dense, in the forward phase
    assert summary["phase_host_syncs"]["forward"] == (2 if sync else 0)


def test_fit_line_recovers_a_line() -> None:
    assert fit_line([(4, 14.0), (32, 28.0), (128, 76.0)]) == pytest.approx((12.0, 0.5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip message is for CPU-only machines")
def test_gpu_section_records_each_row_as_skipped_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    report = cli.main(["--quick", "--sections", "gpu", "--threads", "1", "--out", str(out)])
    rows = report["gpu"]["rows"]
    assert [r["row"] for r in rows] == list(GPU_ROWS)
    for r in rows:
        assert r["skipped"].startswith("no CUDA device") and "--gpu-smoke" in r["skipped"]
    assert json.loads((out / "benchmark.json").read_text())["gpu"]["rows"] == rows
    md = (out / "benchmark.md").read_text()
    assert md.count("| skipped: no CUDA device") == len(GPU_ROWS)
    # --gpu-rows keeps the order of GPU_ROWS whatever the order asked
    report = cli.main(
        ["--quick", "--sections", "gpu", "--gpu-rows", "graphs", "sweep", "--out", str(out)]
    )
    assert [r["row"] for r in report["gpu"]["rows"]] == ["sweep", "graphs"]


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
    batches = collect_batches(datamodule, 5)
    initial = copy.deepcopy(module.state_dict())

    torch.manual_seed(7)
    lightning_fit(cfg, module, batches, tmp_path / "lightning")
    lightning = copy.deepcopy(module.state_dict())
    assert (tmp_path / "lightning" / "checkpoints" / "last.ckpt").is_file()

    def bare(seed: int) -> dict[str, torch.Tensor]:
        module.load_state_dict(initial)
        torch.manual_seed(seed)
        bare_fit(
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

    flops = count_flops(lambda: head(features).sum().backward())
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
    assert count_flops(step) == 7 * product


def test_memory_tracker_counts_live_storages_at_their_peak() -> None:
    params = nn.Linear(100, 10)
    with TensorMemoryTracker(state_tensors(params)) as tracker:
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
        "overrides": [*TINY, f"paths.data_dir={shared_data_dir}", "fusion=late"],
        "threads": 1,
        "device": "cpu",
        "warmup": 1,
        "steps": 1,
    }
    (result,) = run_specs([spec], isolate=True)
    assert result["samples_per_s"] > 0
    assert result["peak_rss_mib"] >= result["rss_increase_mib"] > 0


def test_latency_section_times_new_images_and_follow_ups(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    out = tmp_path / "bench"
    argv = ["--quick", "--sections", "latency", "--threads", "1", "--out", str(out)]
    report = cli.main([*argv, "--data-dir", str(shared_data_dir)])
    latency = json.loads((out / "benchmark.json").read_text())["latency"]
    assert latency == json.loads(json.dumps(report["latency"]))
    sizes = make_sizes(quick=True)
    assert latency["tiny"] and latency["goal"]["met"] is None
    # the goal model is timed twice: plain and served with pre-packed linear layers
    expected = [
        row
        for name in sizes.latency_models
        for row in ([name, f"{name} + {PACKED_ROW}"] if name == GOAL_MODEL else [name])
    ]
    assert [r["model"] for r in latency["rows"]] == expected
    md = (out / "benchmark.md").read_text()
    assert "## 7. Latency of one answer" in md
    for r in latency["rows"]:
        assert r["torch_threads"] == 1
        assert (r["miss"]["n"], r["hit"]["n"]) == (
            sizes.latency_new_images,
            sizes.latency_follow_ups,
        )
        for kind in ("miss", "hit"):
            t = r[kind]
            assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p95_ms"] <= t["max_ms"]
            assert t["min_ms"] <= t["mean_ms"] <= t["max_ms"]
        # every timed follow-up (and each warm-up round's one) was a cache hit, every first
        # question a miss
        assert r["cache"]["hits"] == sizes.latency_follow_ups + sizes.latency_warmup
        assert r["cache"]["misses"] == sizes.latency_new_images + sizes.latency_warmup
        assert min(r["stages_ms"].values()) > 0
        follow_up = [ms for step, ms in r["stages_ms"].items() if "(new image)" not in step]
        assert len(follow_up) == 7 and r["follow_up_steps_ms"] == pytest.approx(sum(follow_up))
        assert r["follow_up_rest_ms"] == pytest.approx(r["hit"]["p50_ms"] - sum(follow_up))
        assert f"| {r['model']} |" in md and f"| {_f(r['hit']['p95_ms'])} |" in md
