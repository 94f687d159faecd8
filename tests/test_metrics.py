"""VQAAccuracy: hand-computed scores, per-type breakdown, de-duplication, state merging."""

from __future__ import annotations

import warnings

import pytest
import torch

from vqa.metrics import UNKNOWN_QUESTION_TYPE, VQAAccuracy

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
    assert gathered == [torch.long, torch.float64, torch.long, torch.long]
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
