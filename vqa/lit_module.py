"""The LightningModule: modality dropout, loss, VQA accuracy and the optimisation recipe.

Everything the Trainer already does (gradient clipping, AMP, accumulation, devices, DDP) stays
in `configs/trainer/`; this module owns only what is specific to VQA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vqa.metrics import VQAAccuracy
from vqa.models.vqa_model import VQAModel, VQAOutput

ANSWER_TYPE_KEYS = {"yes/no": "acc_yesno", "number": "acc_number", "other": "acc_other"}
LOSSES = ("bce", "ce")


class VQALitModule(LightningModule):
    """Trains a `VQAModel` on soft-score targets and scores it with the official VQA accuracy.

    `answer_vocab` and `question_types` are plain lists and `run_config` a plain dict, so a
    checkpoint can rebuild the model and its data pipeline without the original run directory
    and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        net: VQAModel,
        answer_vocab: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer],
        question_types: Sequence[str] = (),
        loss: str = "bce",
        image_dropout: float = 0.1,
        question_dropout: float = 0.1,
        encoder_lr_multiplier: float = 0.1,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        run_config: dict[str, Any] | None = None,
        data_artifacts: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {LOSSES}, got {loss!r}")
        for name, p in (("image_dropout", image_dropout), ("question_dropout", question_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"module.{name} must be a probability in [0, 1], got {p}")
        # Plain values only: the checkpoint's hyper_parameters must load with weights_only=True.
        self.save_hyperparameters(ignore=["net", "optimizer"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.answer_vocab = list(answer_vocab)

        self.train_acc = VQAAccuracy(question_types=question_types)
        self.val_acc = VQAAccuracy(question_types=question_types)
        self.test_acc = VQAAccuracy(question_types=question_types)
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric()

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, Any], **drop: Tensor | None) -> VQAOutput:
        return self.net(
            images=batch.get("images"),
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            visual_features=batch.get("visual_features"),
            **drop,
        )

    def sample_modality_dropout(self, batch_size: int) -> dict[str, Tensor]:
        """Per-sample masks: a sample loses its image or its question, never both.

        Losing both would only teach the answer prior, which the bias of the head already holds.
        """
        p_img, p_q = self.hparams.image_dropout, self.hparams.question_dropout
        u = torch.rand(batch_size, device=self.device)
        drop_image = u < p_img
        # Disjoint events: the question is dropped with probability p_q overall, chosen among the
        # samples that kept their image, so the configured probabilities hold exactly.
        drop_question = (u >= p_img) & (u < p_img + p_q) if p_img + p_q <= 1 else ~drop_image
        return {"drop_image": drop_image, "drop_question": drop_question}

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.hparams.loss == "bce":
            # Summed over answers, averaged over questions (the bottom-up/top-down convention):
            # a mean over 3129 mostly-zero targets would shrink the gradient by 3129x.
            return (
                F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
                / logits.shape[0]
            )
        labels = targets.argmax(dim=1)
        labels[targets.amax(dim=1) <= 0] = -100  # most common answer outside the vocabulary
        return F.cross_entropy(logits, labels, ignore_index=-100)

    def decode(self, logits: Tensor) -> list[str]:
        return [self.answer_vocab[i] for i in logits.argmax(dim=1).tolist()]

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        drop = self.sample_modality_dropout(batch["input_ids"].shape[0]) if stage == "train" else {}
        out = self(batch, **drop)
        loss = self.compute_loss(out.logits, batch["targets"])
        getattr(self, f"{stage}_loss")(loss.detach(), weight=out.logits.shape[0])
        getattr(self, f"{stage}_acc").update(
            predictions=self.decode(out.logits.detach()),
            human_answers=batch["answers"],
            question_ids=batch["question_id"],
            answer_types=batch["answer_type"],
            question_types=batch["question_type"],
        )
        self.log(
            f"{stage}/loss",
            getattr(self, f"{stage}_loss"),
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=out.logits.shape[0],
        )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        out = self(batch)
        return {
            "question_id": batch["question_id"],
            "answer": self.decode(out.logits),
            "logits": out.logits,
        }

    def _log_accuracy(self, stage: str) -> float:
        metric: VQAAccuracy = getattr(self, f"{stage}_acc")
        result = metric.compute()
        overall = result["overall"]
        self.log(f"{stage}/acc", overall, prog_bar=True, sync_dist=False)
        for answer_type, key in ANSWER_TYPE_KEYS.items():
            if answer_type in result:
                self.log(f"{stage}/{key}", result[answer_type])
        metric.reset()
        return float(overall)

    def on_train_start(self) -> None:
        # Lightning's sanity check runs validation before training: do not let it set the best.
        self.val_acc_best.reset()

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        acc = self._log_accuracy("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: encoders at a smaller LR, and no weight decay on norms and biases."""
        base_lr = (
            self.optimizer_factory.keywords.get("lr", 1e-3)
            if hasattr(self.optimizer_factory, "keywords")
            else 1e-3
        )
        encoders = {id(p) for m in (self.net.visual, self.net.text) for p in m.parameters()}
        no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.Embedding)
        no_decay = {
            id(p)
            for m in self.net.modules()
            for name, p in m.named_parameters(recurse=False)
            if name.endswith("bias") or isinstance(m, no_decay_types) or p.ndim <= 1
        }
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in self.net.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in encoders, id(p) in no_decay), []).append(p)
        result = []
        for (is_encoder, skip_decay), params in sorted(groups.items()):
            group: dict[str, Any] = {"params": params}
            if is_encoder:
                group["lr"] = base_lr * self.hparams.encoder_lr_multiplier
            if skip_decay:
                group["weight_decay"] = 0.0
            result.append(group)
        return result

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer,
            num_warmup_steps=int(self.hparams.warmup_fraction * total_steps),
            num_training_steps=total_steps,
            min_lr_rate=self.hparams.min_lr_ratio,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
