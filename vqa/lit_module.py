"""The LightningModule: modality dropout, loss, VQA accuracy and the optimisation recipe.

Everything the Trainer already does (gradient clipping, AMP, accumulation, devices, DDP) stays
in `configs/trainer/`; this module owns only what is specific to VQA, plus the random-number
state a checkpoint needs so that a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling
from pytorch_lightning import LightningModule
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor
from torchmetrics import MaxMetric, Metric

from vqa.data.batch import VQABatch
from vqa.inference import run_model
from vqa.metrics import FAMILY_PREFIX, SoftScoreAccuracy, StepMean, VQAAccuracy
from vqa.models.vqa_model import VQAModel, VQAOutput
from vqa.optim import SchedulerFactory, build_optimization, check_scheduler, parameter_groups

# The training epoch's running metrics: checkpointed (a mid-epoch checkpoint holds the batches
# seen so far), gathered over DDP ranks when saved, emptied when a new epoch starts.
TRAIN_EPOCH_METRICS = ("train_acc", "train_loss")
ANSWER_TYPE_KEYS = {"yes/no": "acc_yesno", "number": "acc_number", "other": "acc_other"}
LOSSES = ("bce", "ce")


def capture_rng_states(device: torch.device) -> dict[str, Any]:
    """Every generator a training step draws from (modality dropout, nn.Dropout, the shuffling
    sampler, augmentations), as tensors and plain values so ``weights_only=True`` loads them.

    Lightning does not checkpoint these; without them a resumed run shuffles and drops
    differently from the run it continues.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        # This device only: get_rng_state_all() would open a context on every GPU of the node.
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng_states`."""
    torch.set_rng_state(states["torch"])
    np_state = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(states["python"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def check_same_world_size(saved: int, current: int) -> None:
    """Refuse to resume a fit on another number of processes.

    Each rank's loader position, the global batch and so the LR schedule's length are those of
    the run that wrote the checkpoint: on another world size the resumed run would train on
    other batches, some twice, with a schedule of another length. An exact resume is the point
    of resuming; to go on with other hardware, start a new run from the weights.
    """
    if saved != current:
        raise RuntimeError(
            f"This checkpoint was written by a run on {saved} process(es) (devices x nodes) and "
            f"this run has {current}: resuming would replay other batches with a schedule of "
            f"another length. Resume with the same trainer.devices/num_nodes (here: {saved} in "
            "all), or start a new run from its weights."
        )


def check_recorded_inputs(
    net: VQAModel,
    streams: list[str] | None,
    conditioning_vocab: dict[str, list[str]] | None,
) -> None:
    """The streams and conditioning vocabulary a checkpoint records must be those ``net`` was
    built with, or the checkpoint would rebuild another model (or map labels to other rows)."""
    built_streams = getattr(net, "streams", None)
    if streams != built_streams:
        raise ValueError(f"module streams {streams}, but the net was built for {built_streams}")
    conditioning = getattr(net, "conditioning", None)
    built = {} if conditioning is None else conditioning.sizes
    given = {} if conditioning_vocab is None else {f: len(v) for f, v in conditioning_vocab.items()}
    if given != built:
        raise ValueError(
            f"conditioning_vocab has {given} values per field, but the net was built for "
            f"{built}: pass the vocabulary the net's conditioning was sized from (the "
            "datamodule's conditioning_vocab), which the checkpoint needs to map labels"
        )


class VQALitModule(LightningModule):
    """Trains a `VQAModel` on soft-score targets and scores it with the official VQA accuracy.

    `answer_vocab`, `question_types` and `question_families` are plain lists and `run_config` a
    plain dict, so a checkpoint can rebuild the model and its data pipeline without the original
    run directory and loads with ``torch.load(weights_only=True)``.

    `question_families` (the datamodule's, empty for data without them such as VQA v2) adds
    validation and test accuracy per family, logged as ``val/family/<family>`` and
    ``test/family/<family>``.

    `streams` (the visual streams' names) and `conditioning_vocab` (per conditioning field, its
    known values in index order) are what the net was built with and what a checkpoint needs
    to rebuild it and to map labels to the same indices (``vqa.checkpoint``); None: one image
    per question, no conditioning. `conditioning_dropout` replaces, in training, each
    question's conditioning ids by the unknown index with that probability, so the unknown
    embedding learns what a question without (known) labels looks like.
    """

    def __init__(
        self,
        net: VQAModel,
        answer_vocab: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory | None = None,
        question_types: Sequence[str] = (),
        question_families: Sequence[str] = (),
        loss: str = "bce",
        image_dropout: float = 0.1,
        question_dropout: float = 0.1,
        encoder_lr_multiplier: float = 0.1,
        text_lr_multiplier: float | None = None,
        run_config: dict[str, Any] | None = None,
        data_artifacts: dict[str, Any] | None = None,
        conditioning_dropout: float = 0.1,
        streams: Sequence[str] | None = None,
        conditioning_vocab: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {LOSSES}, got {loss!r}")
        for name, p in (
            ("image_dropout", image_dropout),
            ("question_dropout", question_dropout),
            ("conditioning_dropout", conditioning_dropout),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"module.{name} must be a probability in [0, 1], got {p}")
        if image_dropout + question_dropout > 1.0:
            raise ValueError(
                "a sample never loses both modalities, so module.image_dropout + "
                f"module.question_dropout must be <= 1, got {image_dropout} + {question_dropout}"
            )
        # the optimizer and the schedule are built at fit start; a wrong argument fails here
        check_scheduler(scheduler)
        # Plain lists and dicts, as saved below; checked against the net they describe (whose
        # stream names are the default).
        if streams is None:
            streams = getattr(net, "streams", None)
        streams = None if streams is None else [str(name) for name in streams]
        conditioning_vocab = (
            None
            if conditioning_vocab is None
            else {str(f): [str(v) for v in values] for f, values in conditioning_vocab.items()}
        )
        check_recorded_inputs(net, streams, conditioning_vocab)
        # Plain values only: the checkpoint's hyper_parameters must load with weights_only=True.
        # The optimizer and scheduler configs are in run_config.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        # A modality that is never dropped never reads its learned null: frozen, it stays out of
        # the optimizer and of DDP's check that every trainable parameter gets a gradient.
        net.null_image.requires_grad_(image_dropout > 0)
        net.null_question.requires_grad_(question_dropout > 0)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.answer_vocab = list(answer_vocab)

        # Training scores on the device, from the targets: the string-level official metric
        # needs every prediction on the host, which would stall each step. Validation and test
        # report the official metric itself.
        self.train_acc = SoftScoreAccuracy()
        # Families fixed here, the same on every rank (see VQAAccuracy); none: not tracked.
        families = list(question_families) or None
        self.val_acc = VQAAccuracy(question_types=question_types, question_families=families)
        self.test_acc = VQAAccuracy(question_types=question_types, question_families=families)
        self.train_loss = StepMean()
        self.val_loss = StepMean()
        self.test_loss = StepMean()
        # Persistent: the best accuracy so far is part of the run, and a resumed run must not
        # forget it (checkpoint selection and sweepers read val/acc_best). So are the training
        # epoch's running metrics: a checkpoint written mid-epoch holds the batches seen so far,
        # and the resumed epoch's train/acc and train/loss_epoch cover the whole epoch.
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)
        for metric in self._train_epoch_metrics():
            metric.persistent(True)
        self._train_metrics_epoch: int | None = None  # the epoch those metrics hold

    # ------------------------------------------------------------------ forward
    def forward(self, batch: VQABatch, **drop: Tensor | None) -> VQAOutput:
        return run_model(self.net, batch, **drop)

    def sample_modality_dropout(self, batch_size: int) -> dict[str, Tensor]:
        """Per-sample masks: a sample loses its image or its question, never both.

        Losing both would only teach the answer prior, which the bias of the head already holds.
        One uniform draw per sample split into disjoint intervals makes the two events exclusive
        while each keeps exactly its configured probability.
        """
        p_img, p_q = self.hparams.image_dropout, self.hparams.question_dropout
        if p_img == 0 and p_q == 0:  # no masks: the model then skips the null inputs entirely
            return {}
        u = torch.rand(batch_size, device=self.device)
        return {"drop_image": u < p_img, "drop_question": (u >= p_img) & (u < p_img + p_q)}

    def sample_conditioning_dropout(self, conditioning_ids: Tensor) -> Tensor:
        """``conditioning_ids`` [B, F] with each question's row replaced by the unknown index
        (0) with probability ``conditioning_dropout``: every field of the question at once, as
        a question that came without its labels."""
        p = self.hparams.get("conditioning_dropout", 0.0)
        if p == 0:
            return conditioning_ids
        drop = torch.rand(conditioning_ids.shape[0], 1, device=conditioning_ids.device) < p
        return conditioning_ids.masked_fill(drop, 0)

    def compute_loss(self, logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
        """The loss of a batch; ``valid`` [B] bool marks its real rows (static-shape batches
        carry padding rows, which must not count). Nothing here waits for the device."""
        # In float32 whatever the autocast dtype: bf16 logits lose the small probabilities that
        # BCE over thousands of mostly-zero targets is made of.
        logits = logits.float()
        if self.hparams.loss == "bce":
            # Summed over answers, averaged over questions (the bottom-up/top-down convention):
            # a mean over 3129 mostly-zero targets would shrink the gradient by 3129x.
            if valid is None:
                return (
                    F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
                    / logits.shape[0]
                )
            per_question = F.binary_cross_entropy_with_logits(
                logits, targets, reduction="none"
            ).sum(dim=1)
            return torch.where(valid, per_question, 0.0).sum() / valid.sum().clamp(min=1)
        labels = targets.argmax(dim=1)
        keep = targets.amax(dim=1) > 0  # the most common answer can be outside the vocabulary
        if valid is not None:
            keep = keep & valid
        # Ignored labels rather than indexing by the mask, whose size the host would have to
        # read back; summed and divided by at least 1, because cross_entropy's mean over zero
        # labels is NaN, and no label is no signal, not NaN.
        ignore = -100
        total = F.cross_entropy(
            logits, torch.where(keep, labels, ignore), ignore_index=ignore, reduction="sum"
        )
        return total / keep.sum().clamp(min=1)

    def decode(self, logits: Tensor) -> list[str]:
        return [self.answer_vocab[i] for i in logits.argmax(dim=1).tolist()]

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: VQABatch, stage: str) -> Tensor:
        """Loss and metrics of an annotated batch. The training step never waits for the
        device: no prediction, score or count is read back on the host until the epoch's end,
        and the answer types reach the training accuracy as the batch's ``answer_type_id``
        tensor, copied with the rest of the batch.

        Static-shape batches carry ``question_valid`` [B] (False on padding rows, which come
        last); their host records (answers, types) hold the real rows only.
        """
        if batch.targets is None:
            raise ValueError(f"{stage} batches need answers: this split has no annotations")
        if stage == "train" and self._train_metrics_epoch != self.current_epoch:
            self._start_train_metrics()
        drop = self.sample_modality_dropout(batch.num_questions) if stage == "train" else {}
        # Drawn only for a batch with conditioning fields: other runs draw as they always did.
        if stage == "train" and getattr(batch, "conditioning_ids", None) is not None:
            batch = dataclasses.replace(
                batch, conditioning_ids=self.sample_conditioning_dropout(batch.conditioning_ids)
            )
        out = self(batch, **drop)
        valid = batch.question_valid
        loss = self.compute_loss(out.logits, batch.targets, valid)
        # The host records hold one entry per real question: their count needs no device read.
        real = batch.num_real_questions
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=real)
        logits = out.logits.detach()
        if stage == "train":
            self.train_acc.update(logits, batch.targets, valid, batch.answer_type_id)
            # Not on the progress bar: Lightning reads every progress-bar value on the host
            # after each batch, which would make every step wait for the GPU. The logger reads
            # it every log_every_n_steps; the bar shows the epoch's loss and accuracies.
            self.log("train/loss_step", loss.detach(), batch_size=real)
        else:
            getattr(self, f"{stage}_acc").update(
                predictions=self.decode(logits[:real]),
                human_answers=batch.answers,
                question_ids=batch.question_id[:real],
                answer_types=batch.answer_type,
                question_types=batch.question_type,
                question_families=batch.question_family,
            )
        return loss

    def _start_train_metrics(self) -> None:
        """The training epoch's metrics start empty. on_train_epoch_end empties them, but a run
        resumed from a checkpoint written at an epoch's last validation (before that hook) goes
        on to the next epoch without running the hook again: the states it restored belong to
        an epoch already logged by the run it continues."""
        for metric in self._train_epoch_metrics():
            metric.reset()
        self._train_metrics_epoch = self.current_epoch

    def _train_epoch_metrics(self) -> list[Metric]:
        return [getattr(self, name) for name in TRAIN_EPOCH_METRICS]

    def training_step(self, batch: VQABatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: VQABatch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: VQABatch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_accuracy(self, stage: str) -> Tensor:
        metric: VQAAccuracy | SoftScoreAccuracy = getattr(self, f"{stage}_acc")
        result = metric.compute()  # synced across DDP ranks by torchmetrics
        overall = result["overall"]
        self.log(f"{stage}/acc", overall, prog_bar=True)
        for answer_type, key in ANSWER_TYPE_KEYS.items():
            if answer_type in result:
                self.log(f"{stage}/{key}", result[answer_type])
        # "<stage>/family/<family>": a group of its own, apart from the answer types' acc_*.
        # Only val/test group by family: the training accuracy stays on the device, by answer
        # type only.
        for key, value in result.items():
            if key.startswith(FAMILY_PREFIX):
                self.log(f"{stage}/{key}", value)
        metric.reset()
        # Epoch losses are computed here, in the same order on every rank, rather than logged
        # as Metric objects: Lightning computes (and syncs) those lazily when something reads
        # them, and rank 0's progress bar reads them before the other ranks would -> gloo
        # aborts / NCCL hangs.
        loss: StepMean = getattr(self, f"{stage}_loss")
        self.log(
            "train/loss_epoch" if stage == "train" else f"{stage}/loss",
            loss.compute(),
            prog_bar=True,
        )
        loss.reset()
        return overall

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        acc = self._log_accuracy("val")
        # The sanity check validates an untrained model: it must not set the best.
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = capture_rng_states(self.device)
        checkpoint["rng_states"] = states
        # Every rank's own streams: they start alike (seed_everything), but dropout draws as
        # many numbers as its rank's padded batch has elements, so they part after one step.
        # Every rank builds the checkpoint (only rank 0 writes it), so this collective is safe.
        if distributed():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, states)
            checkpoint["rng_states_per_rank"] = per_rank
        checkpoint["world_size"] = self.trainer.world_size if self._trainer is not None else 1
        checkpoint["train_metrics_epoch"] = self._train_metrics_epoch
        self._gather_epoch_metrics(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drop_stale_epoch_metrics(checkpoint["state_dict"])
        # Only when resuming a fit: testing a checkpoint, or loading one to evaluate
        # (load_from_checkpoint, no trainer), must not reseed the caller. Restored at load,
        # before anything of the resumed fit can draw.
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        check_same_world_size(checkpoint.get("world_size", 1), self.trainer.world_size)
        if "rng_states" in checkpoint:
            per_rank = checkpoint.get("rng_states_per_rank")
            own = checkpoint["rng_states"] if per_rank is None else per_rank[self.global_rank]
            restore_rng_states(own, self.device)
        self._train_metrics_epoch = checkpoint.get("train_metrics_epoch")
        if self.global_rank != 0:
            self._blank_epoch_metrics(checkpoint["state_dict"])

    # Under DDP each rank's training-epoch metrics hold its own batches, and only rank 0 writes
    # the checkpoint. It therefore stores them gathered over the ranks, and on resume rank 0
    # takes that whole and the others start empty, so the epoch's next sync counts every
    # batch once.
    def _gather_epoch_metrics(self, state_dict: dict[str, Any]) -> None:
        if not distributed():
            return
        for name in TRAIN_EPOCH_METRICS:
            metric = getattr(self, name)
            with metric.sync_context(should_sync=True, should_unsync=True):
                for state, default in metric._defaults.items():
                    value = getattr(metric, state)
                    # a list state comes back from the gather as one tensor
                    state_dict[f"{name}.{state}"] = [value] if isinstance(default, list) else value

    def _drop_stale_epoch_metrics(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint written before the training accuracy moved to the device holds the
        string metric's per-question states, which this module has no place for: the resumed
        epoch's train/acc then covers the batches after the resume only."""
        for name in TRAIN_EPOCH_METRICS:
            states = getattr(self, name)._defaults
            for key in [k for k in state_dict if k.startswith(f"{name}.")]:
                if key.removeprefix(f"{name}.") not in states:
                    del state_dict[key]

    def _blank_epoch_metrics(self, state_dict: dict[str, Any]) -> None:
        for name in TRAIN_EPOCH_METRICS:
            metric = getattr(self, name)
            for state, default in metric._defaults.items():
                key = f"{name}.{state}"
                if key in state_dict:
                    state_dict[key] = [] if isinstance(default, list) else default.clone()

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups (:func:`vqa.optim.parameter_groups`): each encoder apart with its own
        LR multiplier, the fusion and head at the configured LR, and no weight decay on norms,
        biases, embeddings and other vectors.

        Groups are named ``visual``, ``text`` and ``fusion_head`` (``_no_decay`` appended;
        ``lr-AdamW/text`` in the LR monitor). The text encoder has its own multiplier because a
        BERT trained from scratch is unstable at an LR a CNN and the fusion take well
        (``text_lr_multiplier``; null = ``encoder_lr_multiplier``).
        """
        encoder, text = self.hparams.encoder_lr_multiplier, self.hparams.text_lr_multiplier
        return parameter_groups(
            self.net, {"visual": encoder, "text": encoder if text is None else text}
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, also for a fused optimizer under bf16-mixed.

        Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales
        gradients inside its step (fused AdamW), because under 16-mixed the gradients are still
        scaled when clipping runs. bf16-mixed has no GradScaler: the gradients are the real ones,
        and clipping them is exactly what the plugin does for an unfused optimizer. 16-mixed
        keeps Lightning's refusal.
        """
        plugin = self.trainer.precision_plugin
        if (
            gradient_clip_val
            and isinstance(plugin, MixedPrecision)
            and plugin.scaler is None
            and _optimizer_handles_unscaling(optimizer)
        ):
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        """The configured optimizer and LR schedule (:func:`vqa.optim.build_optimization`), over
        the optimizer steps of the whole run: accumulation and limit_train_batches included, the
        same on resume, so a restored scheduler continues on the same curve."""
        return build_optimization(
            self.parameter_groups(),
            self.optimizer_factory,
            self.scheduler_factory,
            self.trainer.estimated_stepping_batches,
        )
