"""Checkpoint evaluation (`python -m vqa.cli.eval`) and checkpoint loading (`vqa.checkpoint`) on a
tiny trained checkpoint: its numbers against the offline evaluator and the training run's own
test metric, the EvalAI files, data overrides, and every way a checkpoint can be unusable."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tests.helpers import CONFIG_DIR, ROOT, compose_config
from tests.tiny_checkpoint import IMAGE_SIZE, TinyRun
from vqa.checkpoint import CheckpointError, load_checkpoint
from vqa.cli import eval as vqa_eval
from vqa.cli.eval import evaluate_checkpoint, resolve_data_config, results_file_name
from vqa.data.features import FeatureStoreError
from vqa.official_scorer import evaluate_results


@pytest.fixture(scope="module")
def checkpoint(run: TinyRun) -> dict[str, Any]:
    """The checkpoint's content without optimizer state: the base of the tampered copies."""
    ckpt = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers")}


def cpu_trainer() -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def evaluate(
    run: TinyRun, out: Path, split: str, method_name: str = "coattn-vqa", **data: Any
) -> vqa_eval.EvalOutcome:
    """Evaluate the tiny checkpoint on CPU; ``data``: overrides of its data config."""
    data = {"num_workers": 0, "cache_dir": str(out / "cache"), **data}
    return evaluate_checkpoint(
        run.ckpt, cpu_trainer(), out, data=data, split=split, method_name=method_name
    )


# ----------------------------------------------------------------------------- evaluation


def test_eval_equals_offline_evaluator_on_its_results_file(run: TinyRun, tmp_path: Path) -> None:
    # test2015: the synthetic set's held-out split, annotated, and the run's test split
    outcome = evaluate(run, tmp_path, "test2015")

    results = json.loads(outcome.results_file.read_text())
    test_ids = [q["question_id"] for q in run.questions("test2015")]
    assert sorted(r["question_id"] for r in results) == sorted(test_ids)
    offline = evaluate_results(
        run.annotations_file("test2015"), run.questions_file("test2015"), outcome.results_file
    )
    metrics = json.loads(outcome.metrics_file.read_text())
    official = offline.official()
    assert {k: metrics[k] for k in official} == official
    assert outcome.report is not None
    assert outcome.report.overall == pytest.approx(offline.overall, abs=1e-9)
    assert outcome.report.per_question == pytest.approx(offline.per_question, abs=1e-9)
    # a second, independent implementation: the torchmetrics metric of the training run's
    # test stage scored the same checkpoint on the same split
    assert outcome.report.overall == pytest.approx(100 * run.test_metrics["test/acc"], abs=1e-4)
    assert (
        metrics["num_questions"]
        == len(test_ids)
        == sum(metrics["counts"]["perAnswerType"].values())
    )
    assert metrics["questions_per_second"] > 0


def test_submission_on_unannotated_split_covers_every_question_once(
    run: TinyRun, tmp_path: Path
) -> None:
    root = Path(shutil.copytree(run.data_root, tmp_path / "shapes"))
    (root / run.annotations_file("test2015").relative_to(run.data_root)).unlink()  # as VQA v2
    outcome = evaluate(run, tmp_path, "test2015", method_name="tiny", root=str(root))

    assert outcome.results_file.name == results_file_name("test2015", "tiny")
    results = json.loads(outcome.results_file.read_text())
    ids = [r["question_id"] for r in results]
    assert len(ids) == len(set(ids))
    assert set(ids) == {q["question_id"] for q in run.questions("test2015")}
    vocab = set(load_checkpoint(run.ckpt).answer_vocab.answers)
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in vocab for r in results)
    assert outcome.report is None
    metrics = json.loads(outcome.metrics_file.read_text())
    assert "EvalAI" in metrics["scored"] and "overall" not in metrics


def test_cli_writes_results_metrics_and_table(
    run: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`python -m vqa.cli.eval ckpt_path=...` through Hydra, in process (no interpreter start-up)."""
    argv = [
        "vqa.cli.eval",
        f"ckpt_path={run.ckpt}",
        f"paths.log_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.eval_batch_size=5",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "hydra.run.dir=" + str(tmp_path / "run"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    vqa_eval.main()
    GlobalHydra.instance().clear()

    out = capsys.readouterr().out
    assert "VQA accuracy on test2015" in out  # no split given: the run's test split, scored
    for row in ("overall", "yes/no", "number", "other", "how many"):
        assert row in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"{metrics['overall']:.2f}" in out
    assert (tmp_path / "run" / results_file_name("test2015", "coattn-vqa")).is_file()


def test_data_group_swap_keeps_the_checkpoints_preprocessing(run: TinyRun, tmp_path: Path) -> None:
    cfg = compose_config(
        "eval", ["ckpt_path=x", "data=vqav2", f"data.root={run.data_root}"], tmp_path
    )
    trained = load_checkpoint(run.ckpt)
    data = resolve_data_config(trained, cfg.data)
    assert data["_target_"] == cfg.data._target_
    assert data["source"]["_target_"].endswith("VQAv2Source")
    assert data["root"] == str(run.data_root)
    assert data["image_size"] == IMAGE_SIZE != cfg.data.image_size  # vqav2.yaml says 448
    assert "tokenizer_name" not in data  # the tokenizer is the checkpoint's, named nowhere here
    explicit = resolve_data_config(trained, cfg.data, explicit={"image_size"})
    assert explicit["image_size"] == cfg.data.image_size
    # without a group: the checkpoint's config with only the non-null overrides on top
    plain = compose_config("eval", ["ckpt_path=x", "data.eval_batch_size=3"], tmp_path)
    merged = resolve_data_config(trained, plain.data)
    assert merged["eval_batch_size"] == 3
    assert merged["source"] == trained.data_config["source"]
    assert merged["cache_dir"] == plain.data.cache_dir  # machine-local, not the training one's
    GlobalHydra.instance().clear()


def test_checkpoint_naming_its_tokenizer_in_the_data_config_still_evaluates(
    run: TinyRun, checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    """Checkpoints written while the data config named the tokenizer (``tokenizer_name``, now
    the text encoder's ``name_or_path``) evaluate as before: their tokenizer travels with them."""
    older = copy.deepcopy(checkpoint)
    older["hyper_parameters"]["run_config"]["data"]["tokenizer_name"] = None
    path = save(tmp_path, older)
    assert "tokenizer_name" not in load_checkpoint(path).data_config
    data = {"num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    older_outcome = evaluate_checkpoint(path, cpu_trainer(), tmp_path / "a", data=data)
    current = evaluate_checkpoint(run.ckpt, cpu_trainer(), tmp_path / "b", data=data)
    assert older_outcome.results_file.read_text() == current.results_file.read_text()


def test_cached_features_are_checked_against_the_checkpoints_encoder(
    run: TinyRun, tmp_path: Path
) -> None:
    """Evaluation hands the rebuilt model's encoder description to the datamodule: the tiny
    run trained its encoder, so no store of frozen maps can stand in for it."""
    with pytest.raises(FeatureStoreError, match=r"frozen visual encoder.*freeze=all"):
        evaluate(run, tmp_path, "val2014", features="cached", feature_dir=str(tmp_path / "maps"))


def test_official_layout_source_scores_like_the_synthetic_one(run: TinyRun, tmp_path: Path) -> None:
    """`data=vqav2 data.root=...` reads the same files through the other source: same answers."""
    overrides = ["data=vqav2", f"data.root={run.data_root}", "data.num_workers=0"]
    overrides.append("data.pin_memory=false")
    cfg = compose_config("eval", ["ckpt_path=x", *overrides], tmp_path)
    swapped = evaluate_checkpoint(
        run.ckpt, cpu_trainer(), tmp_path / "a", data=cfg.data, split="val2014"
    )
    GlobalHydra.instance().clear()
    plain = evaluate(run, tmp_path / "b", "val2014")
    assert swapped.results_file.read_text() == plain.results_file.read_text()


def test_skipped_unreadable_images_are_reported_not_scored(run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    shutil.copytree(run.data_root, root)
    broken = run.questions("val2014")[0]["image_id"]
    image = root / "Images" / "mscoco" / "val2014" / f"COCO_val2014_{broken:012d}.jpg"
    image.write_bytes(image.read_bytes()[:100])  # truncated JPEG
    on_image = {q["question_id"] for q in run.questions("val2014") if q["image_id"] == broken}

    outcome = evaluate(run, tmp_path / "out", "val2014", root=str(root), on_bad_record="skip")
    assert set(outcome.missing_question_ids) == on_image
    results = json.loads(outcome.results_file.read_text())
    assert {r["question_id"] for r in results}.isdisjoint(on_image)
    metrics = json.loads(outcome.metrics_file.read_text())
    assert metrics["num_missing"] == len(on_image)
    assert metrics["num_questions"] == len(run.questions("val2014")) - len(on_image)
    assert sum(metrics["counts"]["perAnswerType"].values()) == metrics["num_questions"]


def test_spawned_processes_are_rejected(run: TinyRun, tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match="strategy=ddp"):
        evaluate_checkpoint(run.ckpt, trainer, tmp_path, data={"num_workers": 0})


@pytest.mark.slow
def test_ddp_gathers_both_ranks_predictions(run: TinyRun, tmp_path: Path) -> None:
    """`trainer.strategy=ddp trainer.devices=2` (two gloo processes): the same results file as
    one process, each question once."""
    command = [
        sys.executable,
        "-m",
        "vqa.cli.eval",
        f"ckpt_path={run.ckpt}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.eval_batch_size=3",
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "callbacks=none",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = tmp_path / "ddp" / results_file_name("val2014", "coattn-vqa")
    single = evaluate(run, tmp_path / "single", "val2014")
    assert json.loads(ddp.read_text()) == json.loads(single.results_file.read_text())


# ----------------------------------------------------------------------------- bad checkpoints


def save(tmp_path: Path, content: Any, name: str = "bad.ckpt") -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


def test_truncated_file_is_reported_as_corrupted(run: TinyRun, tmp_path: Path) -> None:
    data = run.ckpt.read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt is corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


class _RunsCode:
    """Pickles to a call of os.system: what weights_only=True must refuse to execute."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = save(tmp_path, {"state_dict": {}, "hyper_parameters": {"x": _RunsCode(marker)}})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_config_targets_outside_the_package_are_refused(
    checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    tampered = copy.deepcopy(checkpoint)
    tampered["hyper_parameters"]["run_config"]["model"]["fusion"] = {
        "_target_": "os.system",
        "_args_": [f"touch {marker}"],
    }
    with pytest.raises(CheckpointError, match=r"'os\.system' is outside vqa\.models\.\*"):
        load_checkpoint(save(tmp_path, tampered))
    assert not marker.exists()


def test_head_for_another_vocabulary_size(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    tampered = copy.deepcopy(checkpoint)
    hparams = tampered["hyper_parameters"]
    size = len(hparams["answer_vocab"])
    hparams["answer_vocab"].append("an extra answer")
    hparams["data_artifacts"]["answer_vocab"].append("an extra answer")
    with pytest.raises(
        CheckpointError,
        match=f"answer head has {size} outputs but the answer vocabulary has {size + 1} answers",
    ):
        load_checkpoint(save(tmp_path, tampered))


def test_weights_of_another_fusion(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    tampered = copy.deepcopy(checkpoint)
    fusion = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "fusion" / "alternating.yaml"))
    fusion["hidden_dim"] = 32
    tampered["hyper_parameters"]["run_config"]["model"]["fusion"] = fusion
    with pytest.raises(CheckpointError, match="another fusion block than the config's Alternating"):
        load_checkpoint(save(tmp_path, tampered))


def test_vocabularies_that_disagree(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    tampered = copy.deepcopy(checkpoint)
    tampered["hyper_parameters"]["answer_vocab"].reverse()
    with pytest.raises(CheckpointError, match="disagree"):
        load_checkpoint(save(tmp_path, tampered))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"state_dict": {"w": torch.zeros(1)}}, "not a Lightning checkpoint of this framework"),
        ({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, r"lack \['run_config'"),
        ([torch.zeros(1)], "expected a checkpoint dict"),
    ],
    ids=["plain-state-dict", "foreign-lightning", "not-a-dict"],
)
def test_foreign_checkpoints(content: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(save(tmp_path, content))


def test_missing_file_and_folder(run: TinyRun, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match=r"is a folder.*did you mean .*\.ckpt"):
        load_checkpoint(run.ckpt.parents[1])


def test_rebuilt_model_reproduces_the_trained_weights(run: TinyRun) -> None:
    trained = load_checkpoint(run.ckpt)
    state = torch.load(run.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    rebuilt = trained.model.state_dict()
    assert rebuilt.keys() == {k.removeprefix("net.") for k in state if k.startswith("net.")}
    assert all(torch.equal(v, state[f"net.{k}"]) for k, v in rebuilt.items())
    assert not trained.model.training
