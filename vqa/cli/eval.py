"""Checkpoint evaluation: `python -m vqa.cli.eval ckpt_path=... [data=vqav2 data.root=... split=...]`.

Rebuilds the model, vocabulary and tokenizer from the checkpoint, runs one split and writes into
the run folder an EvalAI results file ``[{"question_id", "answer"}]`` covering every question of
the split, plus ``metrics.json``. Annotated splits (val2014, and the synthetic set's test2015)
are scored by the offline evaluator (:func:`vqa.official_scorer.evaluate_results`, the official
algorithm) on exactly the results that file holds; VQA v2's test-dev2015 / test2015 have no public
answers, so the file is the submission and scoring happens on EvalAI.

A checkpoint trained with several images per question (``data.streams``) or conditioning fields
(``data.conditioning_fields``) is evaluated on the same streams and fields, its labels mapped
with its own vocabulary; the split's questions whose label the model never saw in training (or
that have none) are answered with the learned unknown embedding, and counted in
``metrics.json`` (``unknown_conditioning``: {field: questions}) and the printed summary.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from rich.console import Console
from rich.table import Table
from torch import Tensor

from vqa.checkpoint import TrainedModel, load_checkpoint
from vqa.cli.extract import (
    build_missing_stores,
    default_options,
    ready_encoder,
    resolve_device,
    write_stores,
)
from vqa.config_schema import register_schemas
from vqa.data.batch import VQABatch
from vqa.data.datamodule import VQADataModule
from vqa.data.features import ExtractionReport
from vqa.data.table import column
from vqa.inference import run_model
from vqa.models.vqa_model import VQAModel
from vqa.official_scorer import EvalReport, evaluate_results
from vqa.utils import apply_extras, instantiate_callbacks, set_project_root
from vqa.utils.project import CONFIG_DIR

log = logging.getLogger(__name__)

# The model was trained on these: a `data=<group>` swap must not silently change them.
PREPROCESSING_KEYS = ("image_size", "max_question_length")
# What the model reads per question; always the checkpoint's (another value cannot feed it).
MODEL_INPUT_KEYS = ("streams", "conditioning_fields")
METRICS_FILE = "metrics.json"


class SplitPredictor(pl.LightningModule):
    """Predicts one answer id per question; the Trainer brings devices, precision and DDP."""

    def __init__(self, net: VQAModel) -> None:
        super().__init__()
        self.net = net
        self._question_ids: list[Tensor] = []
        self._answer_ids: list[Tensor] = []
        self._start = 0.0
        self.predictions: dict[int, int] = {}
        self.seconds = 0.0  # the prediction loop, data loading included (not process launch)

    def on_predict_start(self) -> None:
        self._start = time.perf_counter()

    def predict_step(self, batch: VQABatch, batch_idx: int) -> Tensor:
        real = batch.num_real_questions  # padding rows (static shapes) come last
        answer_ids = run_model(self.net, batch).logits[:real].argmax(dim=1)
        self._question_ids.append(batch.question_id[:real])
        self._answer_ids.append(answer_ids)
        return answer_ids  # kept by the caller only with return_predictions=True

    def on_predict_epoch_end(self) -> None:
        self.seconds = time.perf_counter() - self._start
        ids, answers = self._gather(torch.cat(self._question_ids), torch.cat(self._answer_ids))
        # DistributedSampler pads with repeated questions: the dict keeps each one once.
        self.predictions = dict(zip(ids.tolist(), answers.tolist(), strict=True))
        self._question_ids.clear()
        self._answer_ids.clear()

    def _gather(self, ids: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
        """All ranks' predictions on every rank. Ranks may hold different counts (skipped
        unreadable images), and all_gather needs equal shapes: pad with -1, then drop."""
        if self.trainer.world_size == 1:
            return ids, answers
        counts = self.all_gather(torch.tensor(ids.numel(), device=ids.device))
        width = int(counts.max())
        padded = torch.full((2, width), -1, dtype=torch.long, device=ids.device)
        padded[0, : ids.numel()], padded[1, : ids.numel()] = ids, answers
        gathered = self.all_gather(padded)  # [world, 2, width]
        kept = gathered[:, 0] >= 0
        return gathered[:, 0][kept], gathered[:, 1][kept]


@dataclass
class EvalOutcome:
    """What one evaluation produced (``report`` is None for splits without answers)."""

    split: str
    results_file: Path
    metrics_file: Path
    num_questions: int
    seconds: float
    report: EvalReport | None = None
    counts: dict[str, Counter[str]] = field(default_factory=dict)
    missing_question_ids: list[int] = field(default_factory=list)
    # per conditioning field, the split's questions answered with the unknown embedding (None:
    # a model without conditioning fields)
    unknown_conditioning: dict[str, int] | None = None

    @property
    def questions_per_second(self) -> float:
        return self.num_questions / self.seconds if self.seconds > 0 else float("nan")


def explicit_data_keys() -> set[str]:
    """``data.*`` keys given on this run's command line (empty outside a Hydra run)."""
    if not HydraConfig.initialized():
        return set()
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {
        o.key_or_group.removeprefix("data.")
        for o in overrides
        if o.key_or_group.startswith("data.")
    }


def resolve_data_config(
    trained: TrainedModel, data: DictConfig | dict[str, Any], explicit: Collection[str] = ()
) -> dict[str, Any]:
    """The data config to evaluate with: the checkpoint's, with ``data``'s non-null values on top.

    If ``data`` is a whole data config (a ``data=<group>`` choice, it has a ``_target_``) it
    replaces the checkpoint's source and loader settings, but the preprocessing the model was
    trained with stays unless given explicitly (``explicit``: keys set on the command line).
    What the model reads per question (streams, conditioning fields) is the checkpoint's
    (:func:`model_inputs`).
    """
    trained_cfg = trained.data_config
    overlay = OmegaConf.create(data) if isinstance(data, dict) else data.copy()
    swap_source = "_target_" in overlay
    if swap_source:
        kept = {k: trained_cfg[k] for k in PREPROCESSING_KEYS if k not in explicit}
        for key, value in kept.items():
            overlay[key] = value
        log.info("data source swapped to %s; keeping the checkpoint's %s", data.get("source"), kept)
    values = OmegaConf.to_container(overlay, resolve=True)
    values = {k: v for k, v in values.items() if v is not None}
    resolved = values if swap_source else {**trained_cfg, **values}
    # Given by the user: a value of the overlay, or of a swapped-in group if named explicitly.
    given = {k: values[k] for k in MODEL_INPUT_KEYS if k in values}
    if swap_source:
        given = {k: v for k, v in given.items() if k in explicit}
    return {**resolved, **model_inputs(trained, resolved, given)}


def model_inputs(
    trained: TrainedModel, data_config: dict[str, Any], given: dict[str, Any]
) -> dict[str, Any]:
    """The data config keys that say what the model reads per question, where ``data_config``
    has other values than the checkpoint records: its visual streams (``streams``) and its
    conditioning fields (``conditioning_fields``: those of its conditioning vocabulary, in
    column order). A swapped-in data group's own values give way (a single-image model reads
    no pair set's two streams, a model without fields no labels); values ``given`` by the user
    that the model cannot read are refused. One exception: a model of one image per question
    reads any one stream (``data.streams=[right]``)."""
    recorded = {
        "streams": trained.streams,
        "conditioning_fields": (
            None if trained.conditioning_vocab is None else list(trained.conditioning_vocab)
        ),
    }
    for key, value in given.items():
        value = list(value)
        one_image = key == "streams" and len(value) == 1 and len(recorded[key] or [None]) == 1
        if value != recorded[key] and not one_image:
            raise ValueError(
                f"data.{key}={value}, but {trained.path} was trained with {key}={recorded[key]}: "
                f"a model reads the {key.replace('_', ' ')} it was trained with (leave data.{key} "
                "unset)"
            )
    return {
        key: value
        for key, value in recorded.items()
        if key not in given and data_config.get(key) != value
    }


def build_datamodule(
    trained: TrainedModel, data_config: dict[str, Any], split: str
) -> VQADataModule:
    """The datamodule for ``split`` with the checkpoint's answer vocabulary, tokenizer and
    conditioning vocabulary (labels map to the ids the model was trained on), and its visual
    encoder described (cached features are checked against it)."""
    # Objects go to the partial, not to instantiate(): Hydra would turn the AnswerVocab
    # dataclass into a config node.
    datamodule = instantiate(OmegaConf.create(data_config), _partial_=True)(
        answer_vocab=trained.answer_vocab, tokenizer=trained.tokenizer, test_split=split
    )
    if trained.conditioning_vocab is not None:
        datamodule.use_conditioning_vocab(trained.conditioning_vocab)
    if trained.streams is not None:
        # cached features serve one shared encoder, not one per stream: refused before loading
        datamodule.require_shared_streams(trained.model.visual_streams)
    datamodule.use_visual_encoder(trained.model.visual.describe())
    datamodule.prepare_data()
    if datamodule.features == "cached":
        build_split_store(trained, datamodule, split)
    datamodule.setup("predict")
    return datamodule


def build_split_store(trained: TrainedModel, datamodule: VQADataModule, split: str) -> None:
    """Write ``split``'s feature store if it is missing or unfinished, as training does, with
    the checkpoint's own encoder: its maps are then exactly the ones the model was trained on,
    whatever machine made the training stores."""

    def write(splits: list[str]) -> list[ExtractionReport]:
        device = resolve_device("auto")
        # A copy: the model itself stays where the trainer expects it.
        encoder = ready_encoder(copy.deepcopy(trained.model.visual), device)
        options = default_options(progress=False, num_workers=datamodule.num_workers)
        encoder_config = trained.run_config["model"]["visual"]
        return write_stores(datamodule, encoder, encoder_config, splits, options)

    build_missing_stores(datamodule.feature_dir, [split], write)


def results_file_name(split: str, method_name: str) -> str:
    return f"v2_OpenEnded_mscoco_{split}_{method_name}_results.json"


def run_split(
    trained: TrainedModel, datamodule: VQADataModule, trainer: pl.Trainer
) -> tuple[dict[int, str], float]:
    """Answer strings by question id, and the seconds the prediction loop took."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        # Spawned workers' predictions never reach this process.
        raise ValueError(
            "evaluation needs every process to run this script: use trainer.strategy=ddp "
            "(not ddp_spawn / ddp_fork) or a single device"
        )
    predictor = SplitPredictor(trained.model)
    trainer.predict(predictor, datamodule=datamodule, return_predictions=False)
    vocab = trained.answer_vocab
    answers = {qid: vocab.decode(a) for qid, a in predictor.predictions.items()}
    return answers, predictor.seconds


def score(table_columns: dict[str, list[Any]], results: list[dict[str, Any]]) -> EvalReport:
    """The official evaluator on ``results`` against annotations built from the loaded split
    table, so every source (files, hub) is scored by the code that scores a results file."""
    answered = {r["question_id"] for r in results}
    annotations = [
        {
            "question_id": qid,
            "question_type": qtype,
            "answer_type": atype,
            "answers": [{"answer": a} for a in answers],
        }
        for qid, qtype, atype, answers in zip(
            table_columns["question_id"],
            table_columns["question_type"],
            table_columns["answer_type"],
            table_columns["answers"],
            strict=True,
        )
        if qid in answered  # skipped records are reported, not scored as wrong
    ]
    questions = {"questions": [{"question_id": a["question_id"]} for a in annotations]}
    return evaluate_results({"annotations": annotations}, questions, results)


def evaluate_checkpoint(
    ckpt_path: str | Path,
    trainer: pl.Trainer,
    output_dir: str | Path,
    data: DictConfig | dict[str, Any] | None = None,
    split: str | None = None,
    method_name: str = "coattn-vqa",
    explicit: Collection[str] = (),
) -> EvalOutcome:
    """Evaluate ``ckpt_path`` on ``split`` and write the results and metrics files."""
    trained = load_checkpoint(ckpt_path)
    data_config = resolve_data_config(trained, data or {}, explicit)
    split = split or data_config.get("test_split") or data_config["val_split"]
    datamodule = build_datamodule(trained, data_config, split)
    table = datamodule.tables[split]
    predictions, seconds = run_split(trained, datamodule, trainer)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = ["question_id", "question_type", "answer_type", "answers"]
    columns = {name: column(table.table, name) for name in names}
    order = columns["question_id"]
    missing = [qid for qid in order if qid not in predictions]
    outcome = EvalOutcome(
        split=split,
        results_file=output_dir / results_file_name(split, method_name),
        metrics_file=output_dir / METRICS_FILE,
        num_questions=len(predictions),
        seconds=seconds,
        missing_question_ids=missing,
        unknown_conditioning=(
            None
            if trained.conditioning_vocab is None
            else dict(datamodule.unknown_conditioning.get(split, {}))
        ),
    )
    if missing:
        log.warning(
            "%d of %d questions have no prediction (records skipped by on_bad_record=skip: %s); "
            "EvalAI rejects an incomplete submission",
            len(missing),
            len(order),
            datamodule.bad_records.get(split),
        )
    if not trainer.is_global_zero:
        return outcome
    results = [
        {"question_id": qid, "answer": predictions[qid]} for qid in order if qid in predictions
    ]
    outcome.results_file.write_text(json.dumps(results), encoding="utf-8")
    if table.annotated:
        outcome.report = score(columns, results)
        scored = [qid in predictions for qid in order]
        outcome.counts = {
            key: Counter(t for t, keep in zip(columns[name], scored, strict=True) if keep)
            for key, name in (
                ("perAnswerType", "answer_type"),
                ("perQuestionType", "question_type"),
            )
        }
    metrics = _metrics_payload(outcome, trained)
    outcome.metrics_file.write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return outcome


def _metrics_payload(outcome: EvalOutcome, trained: TrainedModel) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "checkpoint": str(trained.path),
        "split": outcome.split,
        "num_questions": outcome.num_questions,
        "num_missing": len(outcome.missing_question_ids),
        "seconds": round(outcome.seconds, 3),
        "questions_per_second": round(outcome.questions_per_second, 2),
        "results_file": outcome.results_file.name,
    }
    if outcome.unknown_conditioning is not None:
        payload["unknown_conditioning"] = outcome.unknown_conditioning
    if outcome.report is None:
        payload["scored"] = "on EvalAI (no public answers for this split)"
        return payload
    return {**payload, **outcome.report.official(), "counts": outcome.counts}


def print_outcome(outcome: EvalOutcome, console: Console | None = None) -> None:
    """A rich table: overall, per answer type, per question type (or the submission note)."""
    console = console or Console()
    speed = f"{outcome.num_questions} questions, {outcome.questions_per_second:.1f} questions/s"
    if unknown := {f: n for f, n in (outcome.unknown_conditioning or {}).items() if n}:
        console.print(
            "questions with conditioning labels unseen in training (or none), answered with "
            "the learned unknown embedding: "
            + ", ".join(f"{field} {count}" for field, count in unknown.items())
        )
    if outcome.report is None:
        console.print(
            f"[bold]{outcome.split}[/] has no public answers: wrote the submission file "
            f"{outcome.results_file} ({speed}). Upload it to the VQA challenge on EvalAI "
            "(eval.ai), which scores it."
        )
        return
    report = outcome.report.official()
    table = Table(title=f"VQA accuracy on {outcome.split} ({speed})")
    table.add_column("group", style="dim")
    table.add_column("type")
    table.add_column("questions", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_row(
        "overall", "", str(outcome.num_questions), f"{report['overall']:.2f}", style="bold"
    )
    for group, key in (("answer type", "perAnswerType"), ("question type", "perQuestionType")):
        table.add_section()
        for name, value in sorted(report[key].items()):
            table.add_row(group, name, str(outcome.counts[key][name]), f"{value:.2f}")
    console.print(table)
    console.print(f"results: {outcome.results_file}\nmetrics: {outcome.metrics_file}")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> float | None:
    ckpt_path = cfg.ckpt_path  # a missing ckpt_path fails here, before anything is built
    apply_extras(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=False,
        enable_checkpointing=False,
    )
    outcome = evaluate_checkpoint(
        ckpt_path,
        trainer,
        cfg.paths.output_dir,
        data=cfg.get("data"),
        split=cfg.get("split"),
        method_name=cfg.method_name,
        explicit=explicit_data_keys(),
    )
    if trainer.is_global_zero:
        print_outcome(outcome)
    return None if outcome.report is None else outcome.report.overall


set_project_root()
register_schemas()

if __name__ == "__main__":
    main()
