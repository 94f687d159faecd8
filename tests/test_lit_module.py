"""`VQALitModule` on its own: modality dropout, losses, padding rows, parameter groups, the
LR schedule, fused AdamW and its gradient clipping, the training-epoch metrics, the
best-accuracy state and the random-number state a resumed run restores. No data set and no
fit: a tiny network and hand-made batches."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from tests.helpers import TINY_OVERRIDES, compose_config
from vqa.data.batch import VQABatch
from vqa.lit_module import VQALitModule, capture_rng_states, restore_rng_states
from vqa.metrics import ANSWER_TYPES
from vqa.utils.op_counter import count_ops

ANSWERS = ["yes", "no", "2", "3", "red", "circle"]
QUESTION_TYPES = ["how many", "is there a", "what color is the"]
VOCAB_SIZE = 40
LR, WEIGHT_DECAY = 3e-4, 0.01


@pytest.fixture
def make_module(tmp_path: Path) -> Callable[..., VQALitModule]:
    """Builds the module exactly as `vqa.cli.train` does, from the composed default config."""
    cfg = compose_config(
        "train",
        [*TINY_OVERRIDES, "model.visual.stages=[layer3]", f"optimizer.lr={LR}"],
        tmp_path,
    )

    def make(**module_kwargs: Any) -> VQALitModule:
        torch.manual_seed(0)
        net = instantiate(cfg.model, num_answers=len(ANSWERS), vocab_size=VOCAB_SIZE)
        return instantiate(cfg.module, **module_kwargs)(
            net=net, answer_vocab=ANSWERS, question_types=QUESTION_TYPES
        )

    return make


def make_batch(batch_size: int = 6, length: int = 7, image_size: int = 32) -> VQABatch:
    """A collated batch as `VQACollator` makes it (one image per question)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, length + 1, (batch_size,), generator=g)
    targets = torch.zeros(batch_size, len(ANSWERS))
    targets[torch.arange(batch_size), torch.arange(batch_size) % len(ANSWERS)] = 1.0
    targets[0, 1] = 0.3  # soft scores: a minority of annotators said "no"
    answer_types = tuple(("number", "yes/no", "other")[i % 3] for i in range(batch_size))
    return VQABatch(
        images=torch.randn(batch_size, 3, image_size, image_size, generator=g),
        input_ids=torch.randint(5, VOCAB_SIZE, (batch_size, length), generator=g),
        attention_mask=(torch.arange(length) < lengths[:, None]).long(),
        image_index=torch.arange(batch_size),
        question_id=torch.arange(batch_size),
        image_id=torch.arange(batch_size),
        question=tuple(f"question {i}" for i in range(batch_size)),
        question_type=tuple(QUESTION_TYPES[i % 3] for i in range(batch_size)),
        answer_type=answer_types,
        answer_type_id=torch.tensor([ANSWER_TYPES.index(t) for t in answer_types]),
        answers=tuple((ANSWERS[i % len(ANSWERS)],) * 10 for i in range(batch_size)),
        targets=targets,
    )


def attach_stub_trainer(module: VQALitModule, **attributes: Any) -> None:
    """What the module reads from its Trainer in the hooks under test, and nothing else."""
    module.trainer = SimpleNamespace(**attributes)  # type: ignore[assignment]


# ----------------------------------------------------------------------------- modality dropout


def test_modality_dropout_rates_are_exact_and_never_both(make_module) -> None:
    module = make_module(image_dropout=0.3, question_dropout=0.2)
    torch.manual_seed(0)
    drop = module.sample_modality_dropout(200_000)
    assert not (drop["drop_image"] & drop["drop_question"]).any()
    # binomial standard deviation ~0.001: 5 sigma
    assert drop["drop_image"].float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert drop["drop_question"].float().mean().item() == pytest.approx(0.2, abs=0.005)

    everything = make_module(image_dropout=1.0, question_dropout=0.0)
    drop = everything.sample_modality_dropout(1000)
    assert drop["drop_image"].all() and not drop["drop_question"].any()
    # Off: no masks at all, so the model never builds a null-image row (which would join
    # BatchNorm statistics in a block's prepare_visual) and draws no random numbers.
    nothing = make_module(image_dropout=0.0, question_dropout=0.0)
    state = torch.get_rng_state()
    assert nothing.sample_modality_dropout(1000) == {}
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(("image", "question"), [(0.0, 0.0), (0.2, 0.0), (0.0, 0.2)])
def test_every_trainable_parameter_takes_part_whatever_the_dropout(
    make_module, image: float, question: float
) -> None:
    """DDP (without find_unused_parameters) needs every trainable parameter in every step's
    graph. A modality whose dropout is off never uses its learned null, so that null is frozen."""
    module = make_module(image_dropout=image, question_dropout=question)
    batch = make_batch()
    loss = module.compute_loss(
        module(batch, **module.sample_modality_dropout(batch.num_questions)).logits,
        batch.targets,
    )
    loss.backward()
    unused = [n for n, p in module.net.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    assert module.net.null_image.requires_grad == (image > 0)
    assert module.net.null_question.requires_grad == (question > 0)


@pytest.mark.parametrize(
    ("image", "question", "message"),
    [
        (1.5, 0.0, r"module\.image_dropout must be a probability"),
        (0.0, -0.1, r"module\.question_dropout must be a probability"),
        (0.6, 0.5, r"image_dropout \+ module\.question_dropout must be <= 1"),
    ],
)
def test_bad_dropout_probabilities_are_rejected(
    make_module, image: float, question: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_module(image_dropout=image, question_dropout=question)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_modality_dropout_only_in_training_steps(make_module) -> None:
    module = make_module(image_dropout=0.5, question_dropout=0.5)
    seen: list[dict[str, Any]] = []
    module.net.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    batch = make_batch()
    module.train()
    module.training_step(batch, 0)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.test_step(batch, 0)
        module(batch)  # inference: vqa.inference.run_model, as prediction and evaluation
    train_kwargs, *eval_kwargs = seen
    assert train_kwargs["drop_image"].shape == (6,)
    assert (train_kwargs["drop_image"] | train_kwargs["drop_question"]).any()
    for kwargs in eval_kwargs:
        assert "drop_image" not in kwargs and "drop_question" not in kwargs


def test_dropped_modality_becomes_the_learned_null_per_sample(make_module) -> None:
    module = make_module()
    module.eval()  # no nn.Dropout noise: compare forwards exactly
    batch = make_batch()
    scrambled = dataclasses.replace(
        batch,
        images=torch.randn_like(batch.images),
        input_ids=torch.randint(5, VOCAB_SIZE, batch.input_ids.shape),
    )
    drop_image = torch.tensor([True, True, False, False, False, False])
    drop_question = torch.tensor([False, False, True, True, False, False])
    plain = module(batch).logits
    dropped = module(batch, drop_image=drop_image, drop_question=drop_question).logits
    dropped_scrambled = module(scrambled, drop_image=drop_image, drop_question=drop_question).logits
    # untouched samples are untouched (per-sample masks, no leak across the batch)
    torch.testing.assert_close(dropped[4:], plain[4:], rtol=0, atol=1e-6)
    assert not torch.allclose(dropped[:4], plain[:4])
    # a dropped image ignores the pixels; a dropped question ignores the tokens
    torch.testing.assert_close(
        module(dataclasses.replace(batch, images=scrambled.images), drop_image=drop_image).logits[
            :2
        ],
        module(batch, drop_image=drop_image).logits[:2],
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        module(
            dataclasses.replace(batch, input_ids=scrambled.input_ids), drop_question=drop_question
        ).logits[2:4],
        module(batch, drop_question=drop_question).logits[2:4],
        rtol=0,
        atol=1e-6,
    )
    assert not torch.allclose(dropped_scrambled[4:], dropped[4:])  # the control does change

    # the nulls are learned: they receive gradient, the dropped encoders none
    module.train()
    all_images = torch.ones(6, dtype=torch.bool)
    module.compute_loss(module(batch, drop_image=all_images).logits, batch.targets).backward()
    assert module.net.null_image.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in module.net.visual.parameters())


# ----------------------------------------------------------------------------- losses


def test_bce_is_summed_over_answers_and_averaged_over_questions(make_module) -> None:
    module = make_module(loss="bce")
    logits = torch.randn(4, len(ANSWERS))
    targets = torch.rand(4, len(ANSWERS))
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum() / 4
    torch.testing.assert_close(module.compute_loss(logits, targets), expected)


def test_ce_uses_the_top_answer_and_skips_questions_without_one(make_module) -> None:
    module = make_module(loss="ce")
    logits = torch.randn(3, len(ANSWERS), requires_grad=True)
    targets = torch.zeros(3, len(ANSWERS))
    targets[0, 2], targets[0, 3] = 1.0, 0.3
    targets[2, 5] = 0.6  # row 1: its most common answer is outside the vocabulary
    loss = module.compute_loss(logits, targets)
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([2, 5]))
    torch.testing.assert_close(loss, expected)

    nothing = module.compute_loss(logits, torch.zeros(3, len(ANSWERS)))
    assert nothing.item() == 0.0  # not NaN, which would poison the weights
    nothing.backward()
    assert not logits.grad.any()


def test_loss_is_computed_in_float32_under_bf16(make_module) -> None:
    module = make_module(loss="bce")
    logits = torch.randn(4, len(ANSWERS)).bfloat16()
    targets = torch.rand(4, len(ANSWERS))
    loss = module.compute_loss(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, module.compute_loss(logits.float(), targets))


def test_unknown_loss_is_rejected(make_module) -> None:
    with pytest.raises(ValueError, match=r"module\.loss must be one of \('bce', 'ce'\), got 'l2'"):
        make_module(loss="l2")


# ----------------------------------------------------------------------------- optimisation


def is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    norms = (nn.LayerNorm, nn.BatchNorm2d, nn.Embedding)
    return isinstance(module, norms) or name == "bias" or param.ndim <= 1


def test_parameter_groups_split_encoders_and_skip_decay_on_norms_biases_embeddings(
    make_module,
) -> None:
    module = make_module(encoder_lr_multiplier=0.1)
    for p in module.net.visual.body.layer1.parameters():  # a frozen stage stays out
        p.requires_grad_(False)
    attach_stub_trainer(module, estimated_stepping_batches=100)
    config = module.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert set(groups) == {
        f"{owner}{suffix}"
        for owner in ("visual", "text", "fusion_head")
        for suffix in ("", "_no_decay")
    }

    where = {id(p): name for name, g in groups.items() for p in g["params"]}
    grouped = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in module.net.parameters() if p.requires_grad]
    assert len(grouped) == len(where) == len(trainable)  # each trainable parameter exactly once
    assert all(id(p) in where for p in trainable)

    owner_of = {
        id(p): name for name in ("visual", "text") for p in getattr(module.net, name).parameters()
    }
    for owner in module.net.modules():
        for name, p in owner.named_parameters(recurse=False):
            if not p.requires_grad:
                assert id(p) not in where
                continue
            expected = owner_of.get(id(p), "fusion_head") + (
                "_no_decay" if is_no_decay(owner, name, p) else ""
            )
            assert where[id(p)] == expected, (owner, name)
    # the learned nulls and the embeddings are among the undecayed
    assert where[id(module.net.null_image)] == "fusion_head_no_decay"
    word_embeddings = next(m for m in module.net.text.modules() if isinstance(m, nn.Embedding))
    assert where[id(word_embeddings.weight)] == "text_no_decay"

    # LR and weight decay as configured: warm-up starts at 0, peaks are recorded per group
    for name, g in groups.items():
        peak = LR * (1.0 if name.startswith("fusion_head") else 0.1)
        assert g["initial_lr"] == pytest.approx(peak)
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else WEIGHT_DECAY)
        assert g["lr"] == 0.0
    assert config["lr_scheduler"]["interval"] == "step"


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor(make_module) -> None:
    module = make_module(
        scheduler={"warmup_fraction": 0.1, "min_lr_ratio": 0.05}, encoder_lr_multiplier=0.5
    )
    attach_stub_trainer(module, estimated_stepping_batches=100)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    head = [step["fusion_head"] for step in lrs]
    assert head[:11] == pytest.approx([LR * s / 10 for s in range(11)])  # linear over 10 steps
    assert head[10] == pytest.approx(LR)
    assert head[55] == pytest.approx(LR * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert all(a >= b for a, b in itertools.pairwise(head[10:]))  # monotone after warm-up
    floor = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert floor["fusion_head"] == pytest.approx(LR * 0.05)
    assert floor["visual"] == floor["text"] == pytest.approx(LR * 0.5 * 0.05)
    assert all(step["visual"] == pytest.approx(0.5 * step["fusion_head"]) for step in lrs)


def test_schedule_needs_a_finite_run(make_module) -> None:
    module = make_module()
    attach_stub_trainer(module, estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match=r"trainer\.max_epochs or trainer\.max_steps"):
        module.configure_optimizers()


# ----------------------------------------------------------------------------- resume state


def test_best_val_accuracy_is_part_of_the_state_dict(make_module) -> None:
    module = make_module()
    module.val_acc_best.update(torch.tensor(0.42))
    state = module.state_dict()
    assert state["val_acc_best.max_value"].item() == pytest.approx(0.42)
    fresh = make_module()
    fresh.load_state_dict(state)
    assert fresh.val_acc_best.max_value.item() == pytest.approx(0.42)
    fresh.val_acc_best.update(torch.tensor(0.3))  # a worse epoch after resuming
    assert fresh.val_acc_best.compute().item() == pytest.approx(0.42)


def draw_from_every_generator() -> tuple[Any, ...]:
    return torch.rand(3), np.random.rand(3), np.random.randn(), random.random()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save({"rng_states": capture_rng_states(torch.device("cpu"))}, tmp_path / "x.ckpt")
    expected = draw_from_every_generator()
    draw_from_every_generator()  # move every generator on

    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)
    restore_rng_states(loaded["rng_states"], torch.device("cpu"))
    got = draw_from_every_generator()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]  # incl. numpy's cached second gaussian


def test_rng_state_is_restored_only_when_resuming_a_fit(make_module) -> None:
    module = make_module()
    torch.manual_seed(3)
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    expected = torch.rand(4)

    # loading to evaluate (no trainer) or to test must leave the caller's RNG alone
    torch.manual_seed(5)
    module.on_load_checkpoint(checkpoint)
    attach_stub_trainer(module, state=SimpleNamespace(fn=TrainerFn.TESTING))
    module.on_load_checkpoint(checkpoint)
    assert not torch.equal(torch.rand(4), expected)

    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    attach_stub_trainer(module, state=fitting, world_size=1, global_rank=0)
    module.on_load_checkpoint(checkpoint)
    assert torch.equal(torch.rand(4), expected)


# ----------------------------------------------------------------------------- padding rows


def padded_copy(batch: VQABatch, extra: int) -> VQABatch:
    """``batch`` with ``extra`` padding rows, as static shapes make them: copies of the last real
    question (its image too, each question keeping its own image row), ``question_valid``/
    ``image_valid`` False, tensors padded and the host records left with the real rows. Unlike
    the collator's, the padding rows keep their targets, so only ``question_valid`` can keep
    them out of the loss and the metrics."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    rows = batch.num_questions
    names = ("images", "input_ids", "attention_mask", "question_id", "image_id", "targets")
    return dataclasses.replace(
        batch,
        **{name: pad(getattr(batch, name)) for name in names},
        answer_type_id=pad(batch.answer_type_id),
        image_index=torch.arange(rows + extra),
        question_valid=torch.arange(rows + extra) < rows,
        image_valid=torch.arange(rows + extra) < rows,
    )


def step_and_gradients(
    module: VQALitModule, batch: VQABatch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_padding_rows_change_neither_loss_nor_gradients_nor_train_metrics(
    make_module, loss: str
) -> None:
    batch = make_batch()
    batch.targets[2] = 0.0  # a question whose answer is outside the vocabulary
    module = make_module(loss=loss, image_dropout=0.0, question_dropout=0.0)
    # Eval mode: nn.Dropout draws as many numbers as the batch has rows, and BatchNorm would mix
    # the copies into its statistics; gradients still flow.
    module.eval()
    reference_loss, reference_grads = step_and_gradients(module, batch)
    reference_metrics = {k: v.clone() for k, v in module.state_dict().items() if "train_" in k}

    padded = make_module(loss=loss, image_dropout=0.0, question_dropout=0.0)
    padded.eval()
    padded_loss, padded_grads = step_and_gradients(padded, padded_copy(batch, extra=4))

    torch.testing.assert_close(padded_loss, reference_loss)
    assert padded_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, msg=name)
    padded_metrics = {k: v for k, v in padded.state_dict().items() if "train_" in k}
    assert padded_metrics.keys() == reference_metrics.keys()
    for key, value in reference_metrics.items():
        torch.testing.assert_close(padded_metrics[key], value, msg=key)
    assert padded.train_acc.count.item() == 6


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_training_accuracy_takes_the_batch_answer_type_ids(make_module, monkeypatch) -> None:
    """The ids travel to the device with the batch: the step builds no tensor of answer types
    on the host (the string path would)."""
    module = make_module()
    batch = make_batch()
    seen: list[Any] = []
    update = module.train_acc.update

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(args[3] if len(args) > 3 else kwargs.get("answer_types"))
        update(*args, **kwargs)

    monkeypatch.setattr(module.train_acc, "update", spy)
    module.training_step(batch, 0)
    assert len(seen) == 1 and seen[0] is batch.answer_type_id
    assert module.train_acc.type_count.tolist() == [2, 2, 2]  # per answer type, on the device


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_the_loss_ignores_padding_rows_whatever_they_hold(make_module, loss: str) -> None:
    module = make_module(loss=loss)
    logits = torch.randn(5, len(ANSWERS))
    targets = torch.rand(5, len(ANSWERS))
    valid = torch.tensor([True, True, True, False, False])
    wild = torch.cat([logits[:3], torch.full((2, len(ANSWERS)), float("nan"))])
    torch.testing.assert_close(
        module.compute_loss(wild, targets, valid), module.compute_loss(logits[:3], targets[:3])
    )
    nothing = module.compute_loss(logits, targets, torch.zeros(5, dtype=torch.bool))
    assert nothing.item() == 0.0


def test_without_padding_the_bce_loss_is_the_original_expression(make_module) -> None:
    """Bit for bit: the quick-start's results are checked exactly."""
    module = make_module(loss="bce")
    logits = torch.randn(7, len(ANSWERS)).bfloat16()
    targets = torch.rand(7, len(ANSWERS))
    expected = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / 7
    assert torch.equal(module.compute_loss(logits, targets), expected)


def test_validation_scores_only_the_real_rows(make_module) -> None:
    batch = make_batch()
    module = make_module()
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
        expected = (module.val_acc.per_question(), module.val_loss.compute())
        module.val_acc.reset()
        module.val_loss.reset()
        module.validation_step(padded_copy(batch, extra=3), 0)
    assert module.val_acc.per_question() == expected[0]
    torch.testing.assert_close(module.val_loss.compute(), expected[1])


def logged_accuracies(
    module: VQALitModule, batch: VQABatch, monkeypatch
) -> tuple[dict[str, float], dict[int, float]]:
    """What a training, a validation and a test epoch of ``batch`` log, by key, and the
    validation accuracy of each question."""
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.update({name: value}))
    module.training_step(batch, 0)
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.test_step(batch, 0)
    per_question = module.val_acc.per_question()
    for stage in ("train", "val", "test"):
        module._log_accuracy(stage)
    return {k: float(v) for k, v in logged.items()}, per_question


def test_validation_and_test_log_accuracy_per_question_family(make_module, monkeypatch) -> None:
    families = ["count_shape", "exists", "relation"]
    module = make_module(question_families=families)
    assert module.hparams.question_families == families  # a plain list in the checkpoint
    batch = dataclasses.replace(
        make_batch(), question_family=tuple(("exists", "count_shape")[i % 2] for i in range(6))
    )
    logged, per_question = logged_accuracies(module, batch, monkeypatch)
    for stage in ("val", "test"):
        for family, first in (("exists", 0), ("count_shape", 1)):
            expected = np.mean([per_question[i] for i in range(first, 6, 2)])
            assert logged[f"{stage}/family/{family}"] == pytest.approx(expected), (stage, family)
        assert f"{stage}/family/relation" not in logged  # asked by no question
    assert not any(k.startswith("train/family/") for k in logged)
    assert {"val/acc_yesno", "val/acc_number", "val/acc_other"} <= logged.keys()


def test_a_module_without_families_logs_none(make_module, monkeypatch) -> None:
    """Data without families (VQA v2), and checkpoints saved before modules took them."""
    module = make_module()
    assert module.hparams.question_families == ()
    logged, _ = logged_accuracies(module, make_batch(), monkeypatch)
    assert "val/acc" in logged and not any("/family/" in k for k in logged)


def test_ce_loss_has_no_host_sync(make_module) -> None:
    module = make_module(loss="ce")
    logits = torch.randn(4, len(ANSWERS), requires_grad=True)
    targets = torch.zeros(4, len(ANSWERS))
    targets[0, 1] = 1.0
    with count_ops() as counted:
        module.compute_loss(logits, targets).backward()
        module.compute_loss(logits, targets, torch.tensor([True, True, False, False]))
    assert counted.host_syncs == 0, (counted.syncs, counted.host_reads)


# ----------------------------------------------------------------------------- train metrics


def test_train_metrics_are_device_tensors_persisted_with_the_checkpoint(make_module) -> None:
    module = make_module()
    state = module.state_dict()
    for name in ("train_acc", "train_loss"):
        keys = [k for k in state if k.startswith(f"{name}.")]
        assert keys and all(isinstance(state[k], torch.Tensor) for k in keys), name


def test_resume_on_another_rank_blanks_the_tensor_states(make_module) -> None:
    module = make_module()
    module.train_acc.update(*soft_batch(), answer_types=["yes/no", "number", "other"])
    module.train_loss.update(torch.tensor(2.0), weight=3)
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"]["train_acc.count"].item() == 3

    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    attach_stub_trainer(module, state=fitting, world_size=1, global_rank=1)
    module.on_load_checkpoint(checkpoint)
    blanked = checkpoint["state_dict"]
    assert blanked["train_acc.count"].item() == 0
    assert blanked["train_acc.type_score"].tolist() == [0.0, 0.0, 0.0]
    assert blanked["train_loss.weight"].item() == 0
    assert blanked["net.null_image"] is not None  # the weights are left alone


def test_a_checkpoint_from_before_the_device_accuracy_still_resumes(make_module) -> None:
    """Older checkpoints hold the string metric's per-question states under train_acc."""
    module = make_module()
    state = module.state_dict()
    for key in [k for k in state if k.startswith("train_acc.")]:
        del state[key]
    state |= {
        "train_acc.question_id": [torch.tensor([1, 2])],
        "train_acc.accuracy": [torch.tensor([1.0, 0.3], dtype=torch.float64)],
    }
    checkpoint: dict[str, Any] = {"state_dict": state}
    attach_stub_trainer(
        module, state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=1, global_rank=0
    )
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: nothing unexpected left
    assert module.train_acc.count.item() == 0


def soft_batch() -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.zeros(3, len(ANSWERS))
    targets[0, 0], targets[1, 2], targets[2, 4] = 1.0, 0.6, 0.3
    return targets + 0.01 * torch.arange(len(ANSWERS)), targets


# ----------------------------------------------------------------------------- fused AdamW


def test_fused_adamw_is_a_config_key_passed_to_the_optimizer(tmp_path: Path) -> None:
    def optimizer_of(*overrides: str) -> torch.optim.Optimizer:
        cfg = compose_config("train", [*TINY_OVERRIDES, *overrides], tmp_path)
        net = instantiate(cfg.model, num_answers=len(ANSWERS), vocab_size=VOCAB_SIZE)
        module = instantiate(cfg.module)(net=net, answer_vocab=ANSWERS)
        attach_stub_trainer(module, estimated_stepping_batches=10)
        return module.configure_optimizers()["optimizer"]

    default = optimizer_of()
    assert isinstance(default, torch.optim.AdamW) and default.defaults["fused"] is None
    fused = optimizer_of("optimizer.fused=true")
    assert fused.defaults["fused"] is True
    assert all(g["fused"] is True for g in fused.param_groups)

    preset = compose_config("train", ["experiment=vqav2_resnet101_bert"], tmp_path)
    assert preset.optimizer.fused is True
    assert preset.trainer.precision == "bf16-mixed" and preset.trainer.gradient_clip_val > 0


def clipping_setup(
    make_module, precision: str, fused: bool
) -> tuple[VQALitModule, torch.optim.Optimizer]:
    module = make_module()
    batch = make_batch()
    module.compute_loss(module(batch).logits, batch.targets).mul(1e3).backward()
    params = [p for p in module.parameters() if p.grad is not None]
    optimizer = torch.optim.AdamW(params, fused=fused)
    attach_stub_trainer(
        module,
        precision_plugin=MixedPrecision(precision, "cpu"),
        gradient_clip_val=0.5,
        gradient_clip_algorithm="norm",
    )
    return module, optimizer


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_clips_the_gradients_of_fused_and_unfused_adamw(make_module, fused: bool) -> None:
    module, optimizer = clipping_setup(make_module, "bf16-mixed", fused)
    params = optimizer.param_groups[0]["params"]
    assert torch.nn.utils.get_total_norm([p.grad for p in params]) > 0.5
    module.configure_gradient_clipping(optimizer, 0.5, "norm")
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(
        0.5, rel=1e-4
    )


def test_16_mixed_keeps_lightnings_refusal_to_clip_for_a_fused_optimizer(make_module) -> None:
    """Its gradients are still scaled when clipping runs: clipping them would be wrong."""
    module, optimizer = clipping_setup(make_module, "16-mixed", fused=True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        module.configure_gradient_clipping(optimizer, 0.5, "norm")
