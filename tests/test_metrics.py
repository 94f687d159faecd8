"""VQAAccuracy: hand-computed scores, per-type breakdown, de-duplication, state merging.
SoftScoreAccuracy (the training accuracy on the device): agreement with VQAAccuracy on real
batches, padding rows, DDP sums, no host sync. StepMean: MeanMetric's mean without a sync."""

from __future__ import annotations

import warnings

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchmetrics import MeanMetric
from torchmetrics.utilities import dim_zero_sum

from vqa.data.batch import VQABatch
from vqa.metrics import (
    ANSWER_TYPES,
    UNKNOWN_FAMILY,
    UNKNOWN_QUESTION_TYPE,
    SoftScoreAccuracy,
    StepMean,
    VQAAccuracy,
)
from vqa.utils.op_counter import count_ops

QUESTION_TYPES = ["how many", "is the", "what color is the"]

# Five questions with hand-computed official accuracies.
BATCH = {
    "predictions": ["yes", "two", "red", "Blue!", "3"],
    "human_answers": [
        ["yes"] * 10,  # 10 matches -> 1.0
        ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"],  # "two" -> "2": 2 matches -> 0.6
        ["blue"] * 10,  # 0.0
        ["blue", "Blue", "blue.", "green", "green", "green", "green", "green", "green", "red"],
        ["3", "three", "4", "4", "4", "4", "4", "4", "4", "4"],  # 2 matches -> 0.6
    ],
    "question_ids": [11, 12, 13, 14, 15],
    "answer_types": ["yes/no", "number", "other", "other", "number"],
    "question_types": ["is the", "how many", "what color is the", "why", "how many"],
}
EXPECTED_ACC = {11: 1.0, 12: 0.6, 13: 0.0, 14: 0.9, 15: 0.6}


def _half(batch: dict, part: slice) -> dict:
    return {k: v[part] for k, v in batch.items()}


def _as_floats(results: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.item() for k, v in results.items()}


def test_hand_computed_accuracy() -> None:
    metric = VQAAccuracy(question_types=QUESTION_TYPES)
    metric.update(**BATCH)
    results = _as_floats(metric.compute())
    expected = {
        "overall": sum(EXPECTED_ACC.values()) / 5,
        "yes/no": 1.0,
        "number": 0.6,
        "other": 0.45,
        "question_type/is the": 1.0,
        "question_type/how many": 0.6,
        "question_type/what color is the": 0.0,
        f"question_type/{UNKNOWN_QUESTION_TYPE}": 0.9,  # "why" is not in the list: kept, not lost
    }
    assert results.keys() == expected.keys()
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    per_question = metric.per_question()
    assert per_question.keys() == EXPECTED_ACC.keys()
    for qid, acc in EXPECTED_ACC.items():
        assert per_question[qid] == pytest.approx(acc, abs=1e-12)


# The synthetic set's families of BATCH's questions; "relation" is asked by none of them.
FAMILIES = ["color_beside", "color_of_shape", "count_shape", "exists", "relation"]
BATCH_FAMILIES = ["exists", "count_shape", "color_of_shape", "color_beside", "count_color"]


def test_accuracy_per_question_family() -> None:
    metric = VQAAccuracy(question_types=QUESTION_TYPES, question_families=FAMILIES)
    metric.update(**BATCH, question_families=BATCH_FAMILIES)
    results = _as_floats(metric.compute())
    families = {k: v for k, v in results.items() if k.startswith("family/")}
    assert families == pytest.approx(
        {
            "family/exists": 1.0,
            "family/count_shape": 0.6,
            "family/color_of_shape": 0.0,
            "family/color_beside": 0.9,  # "other", like color_of_shape, but scored apart
            f"family/{UNKNOWN_FAMILY}": 0.6,  # count_color is not in the list: kept, not lost
        },
        abs=1e-12,
    )
    assert results["other"] == pytest.approx(0.45)  # the answer type mixes the two families
    # merged "ranks" (the DDP gather) group exactly like one metric over every question
    first, second = (VQAAccuracy(QUESTION_TYPES, question_families=FAMILIES) for _ in range(2))
    first.update(**_half(BATCH, slice(0, 3)), question_families=BATCH_FAMILIES[:3])
    second.update(**_half(BATCH, slice(3, 5)), question_families=BATCH_FAMILIES[3:])
    first.merge_state(second)
    merged = _as_floats(first.compute())
    assert {k: v for k, v in merged.items() if k.startswith("family/")} == pytest.approx(families)


def test_families_are_optional_on_both_sides() -> None:
    # no family list: no family keys, whatever the batch carries
    plain = VQAAccuracy(question_types=QUESTION_TYPES)
    plain.update(**BATCH, question_families=BATCH_FAMILIES)
    assert not any(k.startswith("family/") for k in plain.compute())
    # a batch without families (VQA v2 data): every question under the unknown family
    tracking = VQAAccuracy(question_types=QUESTION_TYPES, question_families=FAMILIES)
    tracking.update(**BATCH)
    results = _as_floats(tracking.compute())
    assert [k for k in results if k.startswith("family/")] == [f"family/{UNKNOWN_FAMILY}"]
    assert results[f"family/{UNKNOWN_FAMILY}"] == pytest.approx(results["overall"])
    with pytest.raises(ValueError, match="question_families"):
        tracking.update(**BATCH, question_families=BATCH_FAMILIES[:2])


def test_types_without_questions_are_absent() -> None:
    metric = VQAAccuracy(question_types=QUESTION_TYPES)
    metric.update(**_half(BATCH, slice(0, 1)))
    results = metric.compute()
    assert set(results) == {"overall", "yes/no", "question_type/is the"}
    assert not any(torch.isnan(v) for v in results.values())


def test_duplicate_question_ids_are_counted_once() -> None:
    reference = VQAAccuracy(question_types=QUESTION_TYPES)
    reference.update(**BATCH)
    padded = VQAAccuracy(question_types=QUESTION_TYPES)
    padded.update(**BATCH)
    # What DistributedSampler padding does: the first samples repeated at the end.
    padded.update(**_half(BATCH, slice(0, 2)))
    padded.update(**_half(BATCH, slice(0, 1)))
    assert _as_floats(padded.compute()) == _as_floats(reference.compute())
    assert padded.per_question() == reference.per_question()


def test_merge_state_equals_single_update() -> None:
    whole = VQAAccuracy(question_types=QUESTION_TYPES)
    whole.update(**BATCH)
    first, second = VQAAccuracy(question_types=QUESTION_TYPES), VQAAccuracy(QUESTION_TYPES)
    first.update(**_half(BATCH, slice(0, 3)))
    second.update(**_half(BATCH, slice(2, 5)))  # question 13 on both "ranks"
    first.merge_state(second)
    merged = _as_floats(first.compute())
    expected = _as_floats(whole.compute())
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key] == pytest.approx(expected[key], abs=1e-12), key
    assert first.per_question() == whole.per_question()


def test_simulated_gather_deduplicates_and_keeps_dtypes() -> None:
    # Two identical ranks (worst case of sampler padding) through the real sync path.
    reference, metric = VQAAccuracy(QUESTION_TYPES), VQAAccuracy(QUESTION_TYPES)
    reference.update(**BATCH)
    metric.update(**BATCH)
    metric._sync_dist(dist_sync_fn=lambda t, group=None: [t, t.clone()])
    assert metric.question_id.numel() == 10
    assert metric.question_id.dtype == torch.long and metric.accuracy.dtype == torch.float64
    assert _as_floats(metric.compute()) == _as_floats(reference.compute())
    assert metric.per_question() == reference.per_question()


def test_empty_rank_gathers_states_with_their_real_dtypes() -> None:
    # A rank without batches must offer tensors of the same dtypes as the other ranks,
    # otherwise all_gather fails (torchmetrics alone would send float32 for every state).
    metric = VQAAccuracy(question_types=QUESTION_TYPES)
    gathered: list[torch.dtype] = []

    def fake_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        gathered.append(tensor.dtype)
        return [tensor]

    metric._sync_dist(dist_sync_fn=fake_gather)
    assert gathered == [torch.long, torch.float64, torch.long, torch.long, torch.long]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        assert metric.compute() == {}


def test_no_updates_gives_empty_results() -> None:
    metric = VQAAccuracy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        assert metric.compute() == {}
    assert metric.per_question() == {}


def test_without_question_type_list_reports_no_question_types() -> None:
    metric = VQAAccuracy()
    with pytest.warns(UserWarning, match="question_types"):
        metric.update(**BATCH)
    results = metric.compute()
    assert set(results) == {"overall", "yes/no", "number", "other"}
    assert results["overall"].item() == pytest.approx(0.62)


def test_accepts_tensor_question_ids_and_resets() -> None:
    metric = VQAAccuracy(question_types=QUESTION_TYPES)
    metric.update(**{**BATCH, "question_ids": torch.tensor(BATCH["question_ids"])})
    assert metric.per_question() == pytest.approx(EXPECTED_ACC)
    metric.reset()
    metric.update(**_half(BATCH, slice(2, 3)))
    assert metric.compute()["overall"].item() == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer_types": ["yes/no"] * 4}, "lengths"),
        ({"question_types": ["is the"]}, "lengths"),
        ({"answer_types": ["yes/no", "number", "other", "other", "count"]}, "count"),
        ({"question_types": None}, "question_types"),
    ],
)
def test_update_rejects_bad_input(change: dict, message: str) -> None:
    metric = VQAAccuracy(question_types=QUESTION_TYPES)
    with pytest.raises(ValueError, match=message):
        metric.update(**{**BATCH, **change})


# ----------------------------------------------------------------------------- SoftScoreAccuracy


def _batches(cfg_train: DictConfig) -> tuple[list[VQABatch], list[str]]:
    """Every train and val batch of the tiny synthetic set, as the collator makes them, and
    the answer vocabulary."""
    datamodule = instantiate(cfg_train.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = [*datamodule.train_dataloader(), *datamodule.val_dataloader()]
    return batches, datamodule.answer_vocab.answers


def _scattered_logits(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """Logits whose arg-max lands on right, partly right and wrong answers."""
    g = torch.Generator().manual_seed(seed)
    return targets * torch.rand(targets.shape, generator=g) + 0.3 * torch.rand(
        targets.shape, generator=g
    )


def test_soft_score_accuracy_equals_the_official_metric_on_real_batches(
    cfg_train: DictConfig,
) -> None:
    """The targets the collator builds are the official soft scores, so the score at the
    arg-max is the official accuracy of the decoded answer."""
    official, on_device = VQAAccuracy(), SoftScoreAccuracy()
    scores = set()
    batches, vocab = _batches(cfg_train)
    for i, batch in enumerate(batches):
        logits = _scattered_logits(batch.targets, seed=i)
        official.update(
            predictions=[vocab[j] for j in logits.argmax(dim=1).tolist()],
            human_answers=batch.answers,
            question_ids=batch.question_id,
            answer_types=batch.answer_type,
        )
        # the answer type ids the training step passes, built by the collator
        on_device.update(logits, batch.targets, answer_types=batch.answer_type_id)
        picked = batch.targets.gather(1, logits.argmax(1, keepdim=True))
        scores |= {round(v, 1) for v in picked.flatten().tolist()}
    assert {0.0, 1.0} < scores and len(scores) >= 3  # wrong, right and partly right answers
    expected, got = official.compute(), on_device.compute()
    assert got.keys() == expected.keys() == {"overall", *ANSWER_TYPES}
    for key in expected:
        assert got[key].item() == pytest.approx(expected[key].item(), abs=1e-6), key


def _soft_batch() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    targets = torch.tensor(
        [[1.0, 0.3, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.9], [0.3, 0.0, 0.0]], dtype=torch.float32
    )
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    return logits, targets, ["yes/no", "number", "other", "other"]


def test_soft_score_accuracy_hand_computed() -> None:
    logits, targets, types = _soft_batch()
    metric = SoftScoreAccuracy()
    metric.update(logits, targets, answer_types=types)
    got = _as_floats(metric.compute())
    assert got == pytest.approx(
        {"overall": (1.0 + 0.0 + 0.9 + 0.3) / 4, "yes/no": 1.0, "number": 0.0, "other": 0.6}
    )
    metric.reset()
    metric.update(logits[:1], targets[:1], answer_types=types[:1])
    assert set(metric.compute()) == {"overall", "yes/no"}  # absent, not NaN


def test_soft_score_accuracy_ignores_padding_rows() -> None:
    logits, targets, types = _soft_batch()
    reference = SoftScoreAccuracy()
    reference.update(logits, targets, answer_types=types)
    # Padding rows after the real ones: right answers, NaN logits, anything: they must not count.
    pad_logits = torch.cat([logits, torch.full((3, 3), float("nan")), logits[:2]])[:9]
    pad_targets = torch.cat([targets, torch.ones(5, 3)])
    valid = torch.arange(9) < 4
    padded = SoftScoreAccuracy()
    padded.update(pad_logits, pad_targets, valid, answer_types=types)  # names of the real rows
    with_ids = SoftScoreAccuracy()
    ids = torch.tensor([0, 1, 2, 2, 1, 1, 1, 1, 1])
    with_ids.update(pad_logits, pad_targets, valid, answer_types=ids)
    assert _as_floats(padded.compute()) == _as_floats(reference.compute())
    assert _as_floats(with_ids.compute()) == _as_floats(reference.compute())
    assert padded.count.item() == 4 and padded.type_count.tolist() == [1, 1, 2]


def test_soft_score_accuracy_states_are_summed_across_ranks() -> None:
    """Plain sums: DDP adds the ranks' states (``dist_reduce_fx="sum"``), and merging two
    halves equals one update with everything."""
    logits, targets, types = _soft_batch()
    whole = SoftScoreAccuracy()
    whole.update(logits, targets, answer_types=types)
    first, second = SoftScoreAccuracy(), SoftScoreAccuracy()
    first.update(logits[:2], targets[:2], answer_types=types[:2])
    second.update(logits[2:], targets[2:], answer_types=types[2:])
    assert all(fx is dim_zero_sum for fx in first._reductions.values())
    assert all(isinstance(d, torch.Tensor) for d in first._defaults.values())
    first.merge_state(second)
    assert _as_floats(first.compute()) == _as_floats(whole.compute())
    # the real sync path, two identical "ranks"
    second._sync_dist(dist_sync_fn=lambda t, group=None: [t, t.clone()])
    assert second.count.item() == 4


def test_soft_score_accuracy_update_never_reads_the_device() -> None:
    logits, targets, types = _soft_batch()
    metric = SoftScoreAccuracy()
    valid = torch.tensor([True, True, True, False])
    with count_ops() as counted:
        metric.update(logits, targets, valid, answer_types=types[:3])
        metric.update(logits, targets, answer_types=types)
        metric.update(logits, targets)
    assert counted.host_syncs == 0, (counted.syncs, counted.host_reads)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer_types": ["yes/no", "count", "other", "other"]}, "count"),
        ({"answer_types": ["yes/no"] * 3}, "3 answer types for 4 rows"),
        ({"answer_types": ["yes/no"] * 5}, "5 answer types for 4 rows"),
    ],
)
def test_soft_score_accuracy_rejects_bad_input(kwargs: dict, message: str) -> None:
    logits, targets, _ = _soft_batch()
    with pytest.raises(ValueError, match=message):
        SoftScoreAccuracy().update(logits, targets, **kwargs)
    with pytest.raises(ValueError, match="differ"):
        SoftScoreAccuracy().update(logits[:, :2], targets)


def test_soft_score_accuracy_is_empty_before_any_update() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute before update
        assert SoftScoreAccuracy().compute() == {}


# ----------------------------------------------------------------------------- StepMean


def test_step_mean_is_meanmetric_weighted_mean_without_a_sync() -> None:
    values = [torch.tensor(0.7), torch.tensor(1.3), torch.tensor(2.9)]
    weights = [8, 8, 3]
    reference, metric = MeanMetric(), StepMean()
    for v, w in zip(values, weights, strict=True):
        reference.update(v, weight=w)
    with count_ops() as counted:
        for v, w in zip(values, weights, strict=True):
            metric.update(v, weight=w)
        metric.update(torch.tensor(5.0), weight=torch.tensor(0))  # a tensor weight, e.g. a count
    assert counted.host_syncs == 0, (counted.syncs, counted.host_reads)
    assert torch.equal(metric.compute(), reference.compute())  # bit for bit: same arithmetic
    assert metric.state_dict().keys() == reference.state_dict().keys()
    metric.update(torch.tensor(float("nan")), weight=1)
    assert metric.compute().isnan()  # not dropped silently
