"""Training features end to end through `vqa.cli.train.train`: AMP, exact resume, modality dropout,
loggers (wandb offline, closing on a crash), gradient clipping, the LR schedule, the losses and
the test stage. Tiny compositions on CPU (tests/helpers.py)."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import struct
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

import vqa.cli.train
from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config, same_state
from vqa.cli.train import build_components, train
from vqa.data.answers import normalize_answer, vqa_accuracy
from vqa.data.layout import annotations_path
from vqa.data.shapes import ensure_generated
from vqa.data.table import column

# ----------------------------------------------------------------------------- helpers


# ResNet-18 up to layer3 (2.8M parameters instead of 11M): optimizer steps and checkpoint
# writes dominate these tiny runs.
FAST_OVERRIDES = ["model.visual.stages=[layer3]", "trainer.num_sanity_val_steps=0"]


def tiny_cfg(tmp_path: Path, data_dir: Path, *overrides: str, test: bool = False) -> DictConfig:
    cfg = compose_config(
        "train",
        [*TINY_OVERRIDES, *TINY_DATA_OVERRIDES, *FAST_OVERRIDES, *overrides],
        tmp_path,
        data_dir,
    )
    with open_dict(cfg):
        cfg.test = test
    return cfg


def train_with(
    cfg: DictConfig,
    monkeypatch: pytest.MonkeyPatch,
    callbacks: Sequence[pl.Callback] = (),
    loggers: Sequence[Logger] = (),
) -> tuple[dict[str, float], dict[str, Any]]:
    """`train(cfg)` with extra callback/logger instances the test keeps hold of."""
    make_callbacks, make_loggers = (
        vqa.cli.train.instantiate_callbacks,
        vqa.cli.train.instantiate_loggers,
    )
    monkeypatch.setattr(
        vqa.cli.train, "instantiate_callbacks", lambda c: [*make_callbacks(c), *callbacks]
    )
    monkeypatch.setattr(
        vqa.cli.train, "instantiate_loggers", lambda c: [*make_loggers(c), *loggers]
    )
    return train(cfg)


def read_csv_metrics(output_dir: str) -> list[dict[str, str]]:
    with open(Path(output_dir) / "csv" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def wandb_records(run_file: Path) -> Iterator[Any]:
    """The protobuf records of an offline wandb run (`run-*.wandb`, a LevelDB-style log: 32 KiB
    blocks of [crc32, length, type] chunks after a 7-byte ':W&B' header). wandb ships no Python
    reader for it any more."""
    from wandb.proto import wandb_internal_pb2

    block, header, data = 32768, 7, run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a wandb transaction log"
    pos, pending = header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run_file(output_dir: str) -> Path:
    import wandb

    # run.finish() returns before wandb-core has flushed the transaction log; ending the
    # service waits for it (the next wandb.init starts a new one).
    wandb.teardown()
    runs = sorted((Path(output_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0]


def wandb_history(run_file: Path) -> dict[str, list[float]]:
    history: dict[str, list[float]] = defaultdict(list)
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                history[key].append(float(item.value_json))
    return history


def wandb_exit_codes(run_file: Path) -> list[int]:
    return [
        r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"
    ]


def initial_weights(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The weights `train(cfg)` starts from (same seed, same build order)."""
    pl.seed_everything(cfg.seed, workers=True)
    _, module = build_components(cfg)
    return {k: v.clone() for k, v in module.net.state_dict().items()}


class DtypeProbe(pl.Callback):
    """Records the dtype of the answer logits in each training forward."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:
                self.dtypes.append(output.dtype)

        pl_module.net.head.register_forward_hook(record)


class StopAfterFirstEpoch(pl.Callback):
    """Ends a 2-epoch run after epoch 0, after its checkpoint is written: an interrupted run."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


class CrashAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("boom: simulated crash in fit")


class SpyLogger(Logger):
    """A logger that remembers how it was finalized."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[str] = []
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(metrics)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.statuses.append(status)


class GradNormProbe(pl.Callback):
    """Total gradient norm before clipping (on_before_optimizer_step runs before the Trainer
    clips) and after the step (gradients are zeroed only at the next batch)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def total_norm(module: torch.nn.Module) -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any):
        self.before.append(self.total_norm(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any):
        self.after.append(self.total_norm(pl_module))


class VisualGradProbe(pl.Callback):
    """Gradient norms of the visual encoder and of what must still learn (head, null image)."""

    def __init__(self) -> None:
        self.visual: list[float] = []
        self.rest: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any):
        net = pl_module.net
        self.visual.append(GradNormProbe.total_norm(net.visual))
        self.rest.append(GradNormProbe.total_norm(net.head) + float(net.null_image.grad.norm()))


class LRProbe(pl.Callback):
    """The LR each parameter group actually steps with, once per optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt):
        self.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})


# ----------------------------------------------------------------------------- AMP


def test_bf16_mixed_step_runs_in_bf16_and_updates_weights(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(
        tmp_path, shared_data_dir, "trainer.precision=bf16-mixed", "trainer.fast_dev_run=true"
    )
    before = initial_weights(cfg)
    probe = DtypeProbe()
    metrics, objects = train_with(cfg, monkeypatch, callbacks=[probe])

    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}  # autocast really ran
    assert math.isfinite(metrics["train/loss_step"]) and metrics["train/loss_step"] > 0
    after = objects["module"].net.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after if after[k].is_floating_point())
    moved = [k for k in before if k.startswith("head.") and not torch.equal(before[k], after[k])]
    assert moved, "one bf16-mixed optimizer step left the head unchanged"


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("group_by_image", [True, False], ids=["image_grouped", "random_sampler"])
def test_resume_from_last_checkpoint_is_exact(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, group_by_image: bool
) -> None:
    """2 epochs straight == 1 epoch, interrupted, + resume from last.ckpt: same metrics, same
    weights, same optimizer and scheduler state. Dropout (modality, head, attention) and, without
    image grouping, torch's RandomSampler draw from the global RNG, so this fails unless the RNG
    state is checkpointed and restored before Lightning builds the resumed epoch's iterator."""
    common = (
        f"data.group_by_image={group_by_image}",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.num_sanity_val_steps=1",  # validates under isolate_rng: must not shift the RNG
        "trainer.deterministic=true",
        "scheduler.warmup_fraction=0.25",
        "module.image_dropout=0.3",
        "module.question_dropout=0.3",
    )
    straight_metrics, straight = train(
        tiny_cfg(tmp_path / "straight", shared_data_dir, *common, test=True)
    )

    interrupted = tiny_cfg(tmp_path / "interrupted", shared_data_dir, *common)
    with monkeypatch.context() as m:
        _, first = train_with(interrupted, m, callbacks=[StopAfterFirstEpoch()])
    assert first["trainer"].current_epoch == 1  # epoch 0 done, epoch 1 never started
    run_checkpoints = Path(interrupted.paths.output_dir) / "checkpoints"
    last = run_checkpoints / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and "rng_states" in ckpt
    # the best-so-far travels with the checkpoint: a resumed run must not forget epoch 0
    assert "val_acc_best.max_value" in ckpt["state_dict"]

    resumed_metrics, resumed = train(
        tiny_cfg(tmp_path / "resumed", shared_data_dir, *common, f"ckpt_path={last}", test=True)
    )

    assert resumed["trainer"].global_step == straight["trainer"].global_step == 6
    assert resumed_metrics == straight_metrics  # every logged value, test/* too, bit for bit
    a, b = straight["module"].state_dict(), resumed["module"].state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not same_state(a[k], b[k])] == []
    opt_a = straight["trainer"].optimizers[0].state_dict()
    opt_b = resumed["trainer"].optimizers[0].state_dict()
    for pid, state in opt_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_b["state"][pid][key]), (pid, key)
    sched_a = straight["trainer"].lr_scheduler_configs[0].scheduler
    sched_b = resumed["trainer"].lr_scheduler_configs[0].scheduler
    assert sched_a.last_epoch == sched_b.last_epoch == 6
    assert sched_a.get_last_lr() == sched_b.get_last_lr()
    # checkpoint selection continues the interrupted run: same best epoch, in the run's folder
    best_a = straight["trainer"].checkpoint_callback
    best_b = resumed["trainer"].checkpoint_callback
    assert Path(best_b.best_model_path).parent == run_checkpoints.resolve()
    assert Path(best_b.best_model_path).name == Path(best_a.best_model_path).name
    assert best_b.best_model_score == best_a.best_model_score


# ----------------------------------------------------------------------------- modality dropout


def question_type_prior_accuracy(datamodule: Any) -> float:
    """VQA accuracy on val of answering each question with the majority (normalised) answer of
    its question type on the train split: the question-only prior."""
    train = datamodule.tables[datamodule.train_split].table
    val = datamodule.tables[datamodule.val_split].table
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    for qtype, answer in zip(
        column(train, "question_type"), column(train, "multiple_choice_answer"), strict=True
    ):
        by_type[qtype][normalize_answer(answer)] += 1
    overall = sum(by_type.values(), Counter()).most_common(1)[0][0]
    scores = [
        vqa_accuracy(by_type[q].most_common(1)[0][0] if q in by_type else overall, answers)
        for q, answers in zip(column(val, "question_type"), column(val, "answers"), strict=True)
    ]
    return sum(scores) / len(scores)


def test_image_dropout_one_learns_nothing_from_images(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """image_dropout=1.0: every training sample sees the learned null image, so the visual
    encoder never gets a gradient, training logits ignore the image, and the model can do no
    better on val than the question-only prior."""
    cfg = tiny_cfg(
        tmp_path,
        shared_data_dir,
        "module.image_dropout=1.0",
        "module.question_dropout=0.0",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint=null",
        "optimizer.lr=3e-3",
    )
    probe = VisualGradProbe()
    _, objects = train_with(cfg, monkeypatch, callbacks=[probe])
    assert probe.visual and all(n == 0.0 for n in probe.visual)
    assert all(n > 0.0 for n in probe.rest)

    module, datamodule = objects["module"], objects["datamodule"]
    module.train()
    batch = next(iter(datamodule.train_dataloader()))
    drop = module.sample_modality_dropout(batch.num_questions)
    assert drop["drop_image"].all() and not drop["drop_question"].any()
    noise = dataclasses.replace(batch, images=torch.randn_like(batch.images) * 5)
    with torch.no_grad():
        torch.manual_seed(0)
        logits = module(batch, **drop).logits
        torch.manual_seed(0)  # same nn.Dropout masks for both forwards
        logits_noise = module(noise, **drop).logits
    torch.testing.assert_close(logits, logits_noise, rtol=0, atol=0)

    # On val, in the regime it was trained in (image replaced by the null), it answers from the
    # question alone: it cannot beat the question-type prior by more than noise on 16 questions.
    module.eval()
    predictions, answers = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            n = batch.num_questions
            out = module(batch, drop_image=torch.ones(n, dtype=torch.bool))
            predictions += module.decode(out.logits)
            answers += batch.answers
    accuracy = sum(map(vqa_accuracy, predictions, answers)) / len(answers)
    prior = question_type_prior_accuracy(datamodule)
    assert accuracy <= prior + 0.1, (accuracy, prior)


# ----------------------------------------------------------------------------- loggers


def test_wandb_offline_run_holds_the_logged_metrics(tmp_path: Path, shared_data_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, shared_data_dir, "logger=wandb", "trainer.max_epochs=2")
    metrics, _ = train(cfg)

    import wandb

    assert wandb.run is None  # finished, not left running in the background
    run_file = wandb_run_file(cfg.paths.output_dir)
    history = wandb_history(run_file)
    assert len(history["val/acc"]) == 2  # one per epoch
    assert history["val/acc"][-1] == pytest.approx(metrics["val/acc"])
    assert history["train/loss_epoch"][-1] == pytest.approx(metrics["train/loss_epoch"])
    assert "lr-AdamW/fusion_head" in history
    for stage in ("train", "val"):  # overall and per answer type
        assert {f"{stage}/acc", f"{stage}/acc_yesno", f"{stage}/acc_number"} <= history.keys()
    assert wandb_exit_codes(run_file) == [0]


def test_crash_in_fit_still_closes_every_logger(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_cfg(tmp_path, shared_data_dir, "logger=wandb", "trainer.max_epochs=2")
    spy = SpyLogger()
    with pytest.raises(RuntimeError, match="boom"):
        train_with(cfg, monkeypatch, callbacks=[CrashAtStep(2)], loggers=[spy])

    import wandb

    assert wandb.run is None
    assert spy.statuses and set(spy.statuses) == {"failed"}
    assert any("train/loss_step" in m for m in spy.metrics)  # it did log before the crash
    run_file = wandb_run_file(cfg.paths.output_dir)
    assert wandb_exit_codes(run_file) == [1]  # marked failed, not "finished"
    logged_steps = sum("train/loss_step" in m for m in spy.metrics)
    assert len(wandb_history(run_file)["train/loss_step"]) == logged_steps


# ----------------------------------------------------------------------------- gradient clipping


def test_gradient_clipping_bounds_the_total_norm(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = 0.05
    norms = {}
    for name, value in (("clipped", clip), ("unclipped", "null")):
        cfg = tiny_cfg(
            tmp_path / name,
            shared_data_dir,
            f"trainer.gradient_clip_val={value}",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=0",
            "callbacks.model_checkpoint=null",
        )
        probe = GradNormProbe()
        with monkeypatch.context() as m:
            train_with(cfg, m, callbacks=[probe])
        norms[name] = probe
    clipped, unclipped = norms["clipped"], norms["unclipped"]
    assert len(clipped.before) == len(clipped.after) == 3
    assert all(n > 10 * clip for n in clipped.before)  # clipping had work to do
    # clip_grad_norm_ scales by clip / (norm + 1e-6): the norm lands on the bound
    assert all(clip * 0.999 <= n <= clip * (1 + 1e-5) for n in clipped.after), clipped.after
    # the probe itself is faithful: without clipping the stepped gradient is the raw one
    assert unclipped.after == pytest.approx(unclipped.before, rel=1e-6)
    assert clipped.before[0] == pytest.approx(unclipped.before[0], rel=1e-5)


# ----------------------------------------------------------------------------- LR schedule


def expected_lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """transformers' cosine-with-min-lr schedule, written out."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def test_lr_warmup_then_cosine_per_optimizer_step_with_accumulation(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lr, multiplier, text_multiplier, min_ratio = 1e-3, 0.1, 0.25, 0.1
    cfg = tiny_cfg(
        tmp_path,
        shared_data_dir,
        "trainer.max_epochs=3",
        "trainer.accumulate_grad_batches=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint=null",
        f"optimizer.lr={lr}",
        f"module.encoder_lr_multiplier={multiplier}",
        f"module.text_lr_multiplier={text_multiplier}",
        "scheduler.warmup_fraction=0.34",
        f"scheduler.min_lr_ratio={min_ratio}",
    )
    probe = LRProbe()
    _, objects = train_with(cfg, monkeypatch, callbacks=[probe])
    trainer = objects["trainer"]

    batches = len(objects["datamodule"].train_dataloader())
    total = 3 * batches // 2  # one optimizer (and scheduler) step per 2 micro-batches
    assert batches == 4 and trainer.global_step == total == len(probe.lrs)
    warmup = int(0.34 * total)
    assert warmup == 2
    for step, group_lrs in enumerate(probe.lrs):
        factor = expected_lr_factor(step, warmup, total, min_ratio)
        assert group_lrs["fusion_head"] == pytest.approx(lr * factor, rel=1e-9, abs=1e-15)
        assert group_lrs["fusion_head_no_decay"] == pytest.approx(lr * factor, rel=1e-9, abs=1e-15)
        assert group_lrs["visual"] == pytest.approx(lr * multiplier * factor, rel=1e-9, abs=1e-15)
        assert group_lrs["text"] == pytest.approx(
            lr * text_multiplier * factor, rel=1e-9, abs=1e-15
        )
    assert probe.lrs[0]["fusion_head"] == 0.0  # warm-up starts from zero
    assert max(g["fusion_head"] for g in probe.lrs) == pytest.approx(lr)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(lr * min_ratio)  # ends on the floor

    # the LR monitor logs the same values per optimizer step, under the group names
    logged = [
        (int(row["step"]), float(row["lr-AdamW/fusion_head"]))
        for row in read_csv_metrics(cfg.paths.output_dir)
        if row.get("lr-AdamW/fusion_head")
    ]
    assert logged and all(
        value == pytest.approx(probe.lrs[step]["fusion_head"], abs=1e-15) for step, value in logged
    )


# ----------------------------------------------------------------------------- losses


def test_ce_loss_trains(tmp_path: Path, shared_data_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, shared_data_dir, "module.loss=ce", "trainer.fast_dev_run=true")
    before = initial_weights(cfg)
    metrics, objects = train(cfg)
    # one step of CE over a few answers starts near log(num_answers), far below the BCE sum
    num_answers = len(objects["datamodule"].answer_vocab)
    assert 0 < metrics["train/loss_step"] < 2 * math.log(num_answers)
    after = objects["module"].net.state_dict()
    assert not torch.equal(before["head.4.weight"], after["head.4.weight"])


def test_unknown_loss_is_a_clear_error(tmp_path: Path, shared_data_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, shared_data_dir, "module.loss=focal", "trainer.fast_dev_run=true")
    with pytest.raises(ValueError, match=r"module\.loss must be one of \('bce', 'ce'\)"):
        train(cfg)


# ----------------------------------------------------------------------------- test stage


def test_unannotated_test_split_skips_test_with_a_log_line(
    tmp_path: Path, shared_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "shapes"
    cfg = tiny_cfg(
        tmp_path,
        shared_data_dir,
        f"data.root={root}",
        "data.test_split=test2015",
        "trainer.fast_dev_run=true",
        test=True,
    )
    ensure_generated(root, instantiate(cfg.data.source))
    annotations_path(root, "test2015").unlink()  # the VQA v2 layout: no public test answers
    with caplog.at_level(logging.WARNING, logger="vqa.cli.train"):
        metrics, objects = train(cfg)
    assert not objects["datamodule"].tables["test2015"].annotated
    assert "val/acc" in metrics and not any(k.startswith("test/") for k in metrics)
    assert "Skipping trainer.test: test split 'test2015' has no annotations" in caplog.text


def test_test_only_run_scores_the_given_checkpoint(tmp_path: Path, shared_data_dir: Path) -> None:
    """`train=false ckpt_path=X` tests X, not the freshly initialised weights."""
    fit_cfg = tiny_cfg(
        tmp_path / "fit", shared_data_dir, "trainer.limit_train_batches=2", test=True
    )
    fit_metrics, fit = train(fit_cfg)
    best = fit["trainer"].checkpoint_callback.best_model_path
    assert best

    test_cfg = tiny_cfg(tmp_path / "test", shared_data_dir, "train=false", f"ckpt_path={best}")
    with open_dict(test_cfg):
        test_cfg.test = True
    metrics, objects = train(test_cfg)
    assert metrics["test/loss"] == fit_metrics["test/loss"]
    assert metrics["test/acc"] == fit_metrics["test/acc"]
    tested = objects["module"].net.state_dict()
    trained = fit["module"].net.state_dict()
    assert all(torch.equal(tested[k], trained[k]) for k in trained)
