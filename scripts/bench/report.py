"""The markdown report writer: one ``_md_<section>`` per section and :func:`markdown`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# ------------------------------------------------------------------------------- markdown


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table; ``align`` has one letter per column: l(eft) or r(ight)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _md_fusions(s: dict[str, Any]) -> list[str]:
    rss = s["isolated"]
    header = ["fusion", "input", "samples/s", "images/s", "ms/step", "peak tensor MiB"]
    header += ["peak RSS MiB", "RSS increase MiB"] if rss else []
    rows = []
    for r in s["rows"]:
        row = [
            r["fusion"],
            "cached (encoder frozen)" if r["path"] == "cached" else "images",
            _f(r["samples_per_s"]),
            _f(r["images_per_s"]),
            _f(r["step_ms"]),
            _f(r["peak_memory_mib"]),
        ]
        if rss:
            row += [_f(r.get("peak_rss_mib"), 0), _f(r.get("rss_increase_mib"), 0)]
        rows.append(row)
    store = s["feature_store"]
    return [
        "## 1. Training throughput and memory per fusion block",
        "",
        f"`{s['config']}`; bare training steps (section 2 gives Lightning's extra cost), "
        f"{s['timed_steps']} timed after {s['warmup_steps']} warm-up, batches already in memory; "
        f"samples = questions. Cached: {s['cached_note']}; the store "
        f"({store['images']} images, {_f(store['kib_per_image'])} KiB each) was written by "
        f"python -m vqa.cli.extract at {_f(store['extract_images_per_s'])} img/s. "
        f"Memory: {s['memory_method']}",
        "",
        *_table(header, "llrrrrrr"[: len(header)], rows),
    ]


def _md_overhead(s: dict[str, Any]) -> list[str]:
    t = s["trainer"]
    rows = [
        [
            kind,
            _f(s[f"{kind}_samples_per_s"]),
            ", ".join(_f(r["samples_per_s"]) for r in s["runs"] if r["kind"] == kind),
        ]
        for kind in ("lightning", "bare")
    ]
    verdict = "meets" if s["overhead_percent"] < s["goal_percent"] else "misses"
    return [
        "## 2. Framework overhead (Lightning vs bare PyTorch loop)",
        "",
        f"`{s['config']}`: precision {t['precision']}, gradient clip {t['gradient_clip_val']}, "
        f"callbacks {', '.join(t['callbacks'])}, logger {', '.join(t['logger']) or 'none'} "
        f"(log_every_n_steps {t['log_every_n_steps']}), as a user has them. Disabled: "
        f"{s['disabled']}. {s['pairs']} interleaved pairs (ABBA), each run from the same "
        f"initial weights, {s['timed_steps']} timed steps after {s['warmup_steps']} warm-up; "
        "medians. The progress bar (on stderr) was "
        f"{'drawn on a terminal' if s['progress_bar_on_terminal'] else 'not on a terminal'}.",
        "",
        *_table(["loop", "samples/s (median)", "runs"], "lrl", rows),
        "",
        f"Ratio Lightning / bare = **{s['ratio']:.3f}**: overhead "
        f"{s['overhead_percent']:.1f} % ({verdict} the < {s['goal_percent']:.0f} % goal).",
    ]


def _md_pipeline(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["path"],
            str(r["num_workers"]),
            _f(r["loader_startup_s"], 2),
            _f(r["loader_samples_per_s"]),
            _f(r["model_samples_per_s"]),
            f"{r['ratio']:.2f}×",
        ]
        for r in s["rows"]
    ]
    header = ["input", "workers", "loader start-up s", "loader samples/s", "model samples/s"]
    return [
        "## 3. Input pipeline vs model",
        "",
        f"fusion={s['fusion']}; {s['note']}. Goal: ratio ≥ {s['goal_ratio']:.0f}.",
        "",
        *_table([*header, "ratio"], "lrrrrr", rows),
        *([] if "jpeg" not in s else ["", *_md_jpeg(s["jpeg"])]),
    ]


JPEG_STAGES = (
    ("read_file", "read the file (page cache)"),
    ("pil_decode", "PIL decode to RGB"),
    ("resize", "resize (PIL, antialias)"),
    ("to_tensor_normalise", "to tensor, float, normalise"),
    ("dataset_image", "**the dataset's whole image path** (file to normalised tensor)"),
    ("batch_in_process", "a worker's whole batch (rows, images, collate), per decoded image"),
    ("torchvision_decode_cpu", "torchvision.io.decode_jpeg on CPU (instead of PIL decode)"),
)


def _md_jpeg(j: dict[str, Any]) -> list[str]:
    d, x = j["data_set"], j["extrapolation"]
    rows = [
        [
            str(r["num_workers"]),
            _f(r["startup_s"], 2),
            _f(r["questions_per_s"]),
            _f(r["images_per_s"]),
            _f(r["images_per_s_per_worker"]),
            f"{r['per_worker_vs_one_worker']:.2f}",
        ]
        for r in j["rows"]
    ]
    header = ["workers", "start-up s", "questions/s", "images/s", "images/s per worker"]
    stages = [[label, _f(j["stages_ms"][key], 2)] for key, label in JPEG_STAGES]
    verdict = "clears" if x["clears_goal"] else "does **not** clear"
    return [
        f"### COCO-sized JPEGs through the VQA v2 loader ({j['image_size']} px)",
        "",
        f"`{j['config']}`: {d['images']} generated photo-like JPEGs of {d['width']}×{d['height']} "
        f"(quality {d['jpeg_quality']}, {_f(d['jpeg_kib_mean'])} KiB mean), {d['questions']} "
        f"questions, batches of {j['batch_size']} questions (image-grouped "
        f"{j['group_by_image']}). {j['note']}.",
        "",
        *_table([*header, "per worker vs 1 worker"], "rrrrrr", rows),
        "",
        f"Where a worker's time goes, ms per image ({_f(j['in_process_images_per_s'])} images/s "
        "for the whole path in-process):",
        "",
        *_table(["stage", "ms/image"], "lr", stages),
        "",
        f"{x['basis'].capitalize()} took {_f(j['one_worker_ms_per_image'], 2)} ms per decoded "
        "image: beyond a worker's whole batch in-process, that is the batch's handover to the "
        "main process (shared memory), plus the drift between separately timed runs.",
        "",
        f"**Extrapolation, not a measurement:** {_f(x['per_worker_images_per_s'])} images/s per "
        f"worker ({x['basis']}) × {x['workers']} workers × {x['questions_per_image']} questions "
        f"per image (VQA v2) = **{_f(x['questions_per_s'], 0)} questions/s**, which {verdict} the "
        f"{_f(x['goal_questions_per_s'], 0)} questions/s goal. The same at the recipe's "
        f"num_workers={x['recipe_workers']}: {_f(x['recipe_workers_questions_per_s'], 0)}; at "
        f"the per-worker rate of the {x['slowest_row_workers']}-worker row (the slowest): "
        f"{_f(x['slowest_row_questions_per_s'], 0)}; from "
        f"the row's own questions/s ({x['measured_questions_per_decode']:.2f} questions per "
        f"decode here) × {x['workers']}: {_f(x['from_row_questions_per_s'], 0)}; from "
        f"the in-process cost alone (no collate, no transfer between processes): "
        f"{_f(x['in_process_questions_per_s'], 0)}. Assumes {x['assumes']}.",
    ]


def _md_scaling(s: dict[str, Any]) -> list[str]:
    settings = [(x["grid"], x["length"]) for x in s["settings"]]
    base = (s["base"]["grid"], s["base"]["length"])
    labels = [f"{g}×{g}, N={n}" for g, n in settings]
    groups: dict[tuple[str, str], dict[tuple[int, int], dict[str, Any]]] = {}
    for r in s["rows"]:
        groups.setdefault((r["fusion"], r["attention"]), {})[(r["grid"], r["length"])] = r

    def cell(values: dict[tuple[int, int], dict[str, Any]], key: tuple[int, int], m: str) -> str:
        value, ref = values[key][m], values[base][m]
        ratio = f" ({value / ref:.1f}×)" if key != base and ref else ""
        return f"{_f(value)}{ratio}"

    out = [
        "## 4. Scaling with grid and question length",
        "",
        f"Batch {s['batch']}, visual stage channels {s['channels']} (each stage twice as fine "
        f"as the next), text {s['text_dim']}-d, hidden {s['hidden_dim']}; {s['note']} Grid = "
        f"last stage; ratios against {labels[settings.index(base)]}.",
    ]
    for metric, title in (("ms", "ms per step"), ("memory_mib", "MiB per step")):
        rows = [
            [fusion, attention]
            + ([f"{next(iter(v.values()))['params'] / 1e6:.2f}M"] if metric == "ms" else [])
            + [cell(v, key, metric) for key in settings]
            for (fusion, attention), v in groups.items()
        ]
        header = ["fusion", "attention", *(["params"] if metric == "ms" else []), *labels]
        out += ["", f"{title}:", "", *_table(header, "ll" + "r" * (len(header) - 2), rows)]
    return out


def _n(value: float) -> str:
    """A per-step count: whole when it is one, else one decimal (averaged over steps)."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _op_list(counts: Iterable[tuple[str, float]] | dict[str, float]) -> str:
    items = counts.items() if isinstance(counts, dict) else counts
    return ", ".join(f"{name.removeprefix('aten.')} {_n(n)}" for name, n in items) or "none"


def _md_gpu(s: dict[str, Any]) -> list[str]:
    out = ["## 5. GPU: fixed cost per step, optimizer, Lightning, CUDA graphs, end to end", ""]
    header = ["row", "setting", "images/step", "questions/step", "ms/step", "questions/s"]
    header += ["images/s", "TFLOP/s", "MFU", "peak MiB"]
    rows = []
    for r in s["rows"]:
        if "step_ms" not in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error')}"
            rows.append([r["row"], r["label"], why, *[""] * (len(header) - 3)])
            continue
        rows.append(
            [
                r["row"],
                r["label"],
                _f(r["images"], 0 if float(r["images"]).is_integer() else 1),
                "n/a" if r["questions"] is None else _f(r["questions"], 1).removesuffix(".0"),
                _f(r["step_ms"]),
                _f(r["questions_per_s"]),
                _f(r["images_per_s"]),
                _f(r["achieved_tflops"], 3),
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
                _f(r["peak_memory_mib"], 0),
            ]
        )
    if "config" not in s:  # every row skipped before anything was composed
        return [*out, *_table(header, "ll" + "r" * (len(header) - 2), rows)]
    smoke = "SMOKE RUN: tiny sizes on CPU, not a GPU figure. " if s["smoke"] else ""
    peak = "n/a" if s["peak_bf16_flops"] is None else _f(s["peak_bf16_flops"] / 1e12)
    out += [
        f"{smoke}Device {s['device']} (peak bf16 {peak} TFLOP/s), `{s['config']}`, precision "
        f"{s['precision']}, channels_last {s['channels_last']}, {s['image_size']} px, "
        f"{s['question_tokens']} tokens per question; {s['timed_steps']} timed steps after "
        f"{s['warmup_steps']} warm-up. FLOPs: {s['flop_method']} Notes: {s['note']}.",
        "",
        *_table(header, "ll" + "r" * (len(header) - 2), rows),
    ]
    found = []
    summary = s["summary"]
    if fixed := summary.get("fixed_cost"):
        shares = ", ".join(
            f"{100 * share:.0f} % at {images} images"
            for images, share in fixed["fixed_share"].items()
        )
        found.append(
            f"Fixed cost (least-squares line of ms/step over images/step, sweep rows): "
            f"**{_f(fixed['fixed_ms'])} ms per step** + {_f(fixed['ms_per_image'], 2)} ms per "
            f"image; the fixed part is {shares}."
        )
    if "grouped_questions_per_s_ratio" in summary:
        found.append(
            f"Image-grouped batches: {summary['grouped_questions_per_s_ratio']:.2f}x the "
            "questions/s of one question per image at the same images per step."
        )
    if "fused_saves_ms" in summary:
        found.append(
            f"AdamW fused instead of foreach: {_f(summary['fused_saves_ms'])} ms less per step."
        )
    for r in s["rows"]:
        if r["row"] == "optimizer" and "ops" in r:
            o = r["ops"]
            found.append(
                f"One bare step, {r['label']}: {_n(o['kernels'])} aten ops (forward "
                f"{_n(o['phases']['forward'])}, backward {_n(o['phases']['backward'])}, optimizer "
                f"{_n(o['phases']['optimizer'])}), {_n(o['host_syncs'])} host syncs "
                f"({_op_list(o['syncs'])}; host reads: {_op_list(o['host_reads'])})."
            )
    if "lightning_over_bare" in summary:
        found.append(
            f"Lightning / bare loop, questions/s: **{summary['lightning_over_bare']:.3f}**."
        )
    if "anchor_share_of_step" in summary:
        found.append(
            f"The ResNet alone takes {100 * summary['anchor_share_of_step']:.0f} % of the VQA "
            "model's bare step at the same images per step."
        )
    for r in s["rows"]:
        if r["row"] == "graphs" and "compile_first_step_s" in r:
            speedup = summary.get("graphs_speedup")
            graphs = "CUDA graphs in use" if r["cuda_graphs"] else "**no CUDA graphs**"
            found.append(
                f"torch.compile(mode='reduce-overhead'): **"
                f"{'n/a' if speedup is None else f'{speedup:.2f}x'}** the eager step rate "
                f"({graphs}: {r['cudagraph_skips']} cudagraph skip(s), which TORCH_LOGS=perf_hints "
                f"names); first (compiling) step {_f(r['compile_first_step_s'])} s, "
                f"{r['unique_graphs']} graph(s), {r['graph_breaks']} graph break(s)"
                f"{': ' + '; '.join(r['graph_break_reasons']) if r['graph_breaks'] else ''}. "
                f"{s['graphs_note']}."
            )
        if r["row"] == "e2e" and "step_ms" in r:
            period = r["period_ms"]
            found.append(
                f"End to end: `{r['command']}`: {r['steps_run']} steps in {r['epochs']} "
                f"epoch(s), {r['steps_timed']} timed after {r['warmup_steps']}; start-to-start "
                f"ms median {_f(period['median'])}, p90 {_f(period['p90'])}, max "
                f"{_f(period['max'])}; process start to first step {_f(r['startup_s'])} s."
            )
        if r["row"] == "e2e" and "error" in r:
            found.append(f"End to end: `{r['command']}` failed: {r['error']}.")
    return [*out, "", *[f"- {line}" for line in found]] if found else out


def _sync_cell(r: dict[str, Any]) -> str:
    where = {k: v for k, v in r["phase_host_syncs"].items() if v}
    cell = f"{_op_list(r['syncs'])}; reads: {_op_list(r['host_reads'])}"
    return f"{cell} (in {_op_list(where)})" if where else cell


def _md_ops(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["fusion"],
            r["loop"],
            _n(r["kernels"]),
            _n(r["phases"].get("forward", 0)),
            _n(r["phases"].get("backward", 0)),
            _n(r["phases"].get("optimizer", 0)),
            _n(r["host_syncs"]),
            _sync_cell(r),
            _op_list(r["top_ops"]),
        ]
        for r in s["rows"]
    ]
    header = ["fusion", "loop", "aten ops/step", "forward", "backward", "optimizer"]
    header += ["host syncs/step", "syncs by op", "top 10 ops"]
    return [
        "## 6. Kernels and host syncs per training step",
        "",
        f"`{s['config']}` on {s['device']}, precision {s['precision']}. Lightning rows: a real "
        f"Trainer, no callbacks or logger; *callbacks, logger*: the user's ({', '.join(s['callbacks'] or [])}; "
        f"logger {', '.join(s['logger'] or []) or 'none'}), averaged over log_every_n_steps steps. "
        f"{s['note']}.",
        "",
        *_table(header, "llrrrrrll", rows),
    ]


def _md_latency(s: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["model"],
            f"{r['visual']} @ {r['image_size']} px, {r['text']}, {r['fusion']}",
            _f(r["params_m"]),
            str(r["torch_threads"]),
            *(_f(r[kind][stat]) for kind in ("miss", "hit") for stat in ("p50_ms", "p95_ms")),
            _f(r["miss"]["mean_ms"]),
            _f(r["hit"]["mean_ms"]),
            f"{r['miss']['n']} / {r['hit']['n']}",
            f"{r['cache']['hits']} / {r['cache']['misses']}",
        ]
        for r in s["rows"]
    ]
    header = ["model", "architecture", "params M", "threads", "new image p50", "new image p95"]
    header += ["follow-up p50", "follow-up p95", "new image mean", "follow-up mean"]
    header += ["timed new / follow-up", "cache hits / misses"]
    steps = list(dict.fromkeys(k for r in s["rows"] for k in r["stages_ms"]))
    stage_rows = [[step, *(_f(r["stages_ms"].get(step), 2) for r in s["rows"])] for step in steps]
    stage_rows += [
        ["**follow-up steps, sum**", *(_f(r["follow_up_steps_ms"], 2) for r in s["rows"])],
        [
            "follow-up p50 minus that sum (top-k, outputs, call overhead)",
            *(_f(r["follow_up_rest_ms"], 2) for r in s["rows"]),
        ],
    ]
    out = [
        "## 7. Latency of one answer (Predictor, image-feature cache)",
        "",
        f"{s['device'].upper()}, {s['threads']} torch thread(s); {s['note']}. Times in ms; "
        f"{s['warmup_rounds']} untimed round(s) first. New image = a cache miss (visual encoder "
        "and prepare_visual run); follow-up = another question about an image already asked "
        "about (its features come from the cache).",
        "",
        *_table(header, "llrr" + "r" * (len(header) - 4), rows),
        "",
        "Where the time goes: median ms of each step, run one by one as a call runs them:",
        "",
        *_table(["step", *(r["model"] for r in s["rows"])], "l" + "r" * len(s["rows"]), stage_rows),
    ]
    goal = s["goal"]
    row = next((r for r in s["rows"] if r["model"] == goal["model"]), None)
    if s["tiny"]:
        out += ["", "TINY SIZES (tests): stand-ins of both models, no goal verdict."]
    elif row is not None:
        verdict = "meets" if goal["met"] else "does **not** meet"
        out += [
            "",
            f"Goal: follow-up p95 ≤ {_f(goal['follow_up_p95_ms'], 0)} ms for {goal['model']}: "
            f"p95 {_f(row['hit']['p95_ms'])} ms, which {verdict} it.",
        ]
    return out


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = [
        "# Benchmark",
        "",
        f"`{meta['command']}`: torch {meta['torch']}, Lightning {meta['lightning']}, device "
        f"{meta['device']}, {meta['threads']} torch thread(s) (torch.set_num_threads in every "
        f"process), {meta['cpu_count']} CPUs, load average at the end "
        f"{', '.join(f'{x:.2f}' for x in meta['load_average'])}; wall {meta['wall_s']:.0f} s.",
    ]
    if meta.get("other_processes_cores") is not None:
        out[-1] += (
            f" Other processes used {meta['other_processes_cores']:.2f} cores on average "
            "meanwhile (/proc/stat minus this run's own CPU time): read the figures with that in "
            "mind."
        )
    q = meta["quickstart"]
    out += [
        "",
        f"Quick-start as composed now: fusion={q['fusion']} (hidden {q['fusion_hidden_dim']}), "
        f"{q['visual']} stages {q['visual_stages']} (freeze {q['visual_freeze']}), {q['text']}, "
        f"{q['image_size']} px, batch {q['batch_size']} questions (image-grouped "
        f"{q['group_by_image']}), {q['num_workers']} loader workers, precision {q['precision']}.",
    ]
    writers = {
        "fusions": _md_fusions,
        "overhead": _md_overhead,
        "pipeline": _md_pipeline,
        "scaling": _md_scaling,
        "gpu": _md_gpu,
        "ops": _md_ops,
        "latency": _md_latency,
    }
    for name, write in writers.items():
        if name in report:
            out += ["", *write(report[name])]
    return "\n".join(out) + "\n"
