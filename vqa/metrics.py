"""VQA accuracy as torchmetrics ``Metric``s, DDP-safe: the official string-level score for
evaluation, and its soft-score equivalent on the device for the training loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn
from torchmetrics.utilities.distributed import gather_all_tensors

from vqa.data.answers import vqa_accuracy

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")
UNKNOWN_QUESTION_TYPE = "<unknown>"
UNKNOWN_FAMILY = "<unknown>"
FAMILY_PREFIX = "family/"  # compute()'s keys of the per-family accuracies


class VQAAccuracy(Metric):
    """Official VQA accuracy, overall and per answer / question type / question family.

    Per-question scores are kept (``cat`` states keyed by question id) rather than running sums,
    because Lightning's ``DistributedSampler`` pads the last batch with repeated samples: only
    with the ids can ``compute`` count each question once. Type names are mapped to indices
    from lists fixed at construction, so every rank uses the same mapping; pass the sorted
    question types of the dataset. A question type missing from that list is counted under
    ``question_type/<unknown>`` instead of being dropped.

    ``question_families`` (the synthetic set's templates, finer than answer types) are grouped
    the same way, under ``family/<name>``; a question without a family, or with one missing
    from the list, under ``family/<unknown>``. None (the default) tracks no families.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    question_id: list[Tensor] | Tensor
    accuracy: list[Tensor] | Tensor
    answer_type: list[Tensor] | Tensor
    question_type: list[Tensor] | Tensor
    question_family: list[Tensor] | Tensor

    def __init__(
        self,
        question_types: Sequence[str] | None = None,
        *,
        answer_types: Sequence[str] = ANSWER_TYPES,
        question_families: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.answer_types = tuple(answer_types)
        self.question_types = None if question_types is None else tuple(question_types)
        self.question_families = None if question_families is None else tuple(question_families)
        self._answer_type_index = {name: i for i, name in enumerate(self.answer_types)}
        # The unknown buckets are the indices just past the known question types / families.
        self._question_type_index = {name: i for i, name in enumerate(self.question_types or ())}
        self._family_index = {name: i for i, name in enumerate(self.question_families or ())}
        self._state_dtypes = {
            "question_id": torch.long,
            "accuracy": torch.float64,  # exact enough to round percentages like the official tool
            "answer_type": torch.long,
            "question_type": torch.long,
            "question_family": torch.long,
        }
        for name in self._state_dtypes:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        predictions: Sequence[str],
        human_answers: Sequence[Sequence[str]],
        question_ids: Tensor | Sequence[int],
        answer_types: Sequence[str],
        question_types: Sequence[str] | None = None,
        question_families: Sequence[str | None] | None = None,
    ) -> None:
        """Score a batch of predicted answer strings against the ten human answers each.

        ``question_families`` None: the batch names none (VQA v2), each question counts under
        ``family/<unknown>`` when the metric tracks families.
        """
        n = len(predictions)
        lengths = {
            "human_answers": len(human_answers),
            "question_ids": len(question_ids),
            "answer_types": len(answer_types),
        }
        if question_types is not None:
            lengths["question_types"] = len(question_types)
        if question_families is not None:
            lengths["question_families"] = len(question_families)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"VQAAccuracy.update: {n} predictions but lengths {bad}")
        unknown = sorted(set(answer_types) - self._answer_type_index.keys())
        if unknown:
            raise ValueError(f"unknown answer types {unknown}; expected one of {self.answer_types}")
        if self.question_types is not None and question_types is None:
            raise ValueError("this metric tracks question types: pass question_types to update()")
        if self.question_types is None and question_types is not None:
            rank_zero_warn(
                "VQAAccuracy was built without question_types; per-question-type accuracy is "
                "not reported. Pass the dataset's question types at construction to get it."
            )

        unknown_qtype = len(self._question_type_index)
        qtypes = question_types if self.question_types is not None else [""] * n
        device = self.device
        self.question_id.append(torch.as_tensor(question_ids, dtype=torch.long, device=device))
        self.accuracy.append(
            torch.tensor(
                [vqa_accuracy(p, h) for p, h in zip(predictions, human_answers, strict=True)],
                dtype=torch.float64,
                device=device,
            )
        )
        self.answer_type.append(
            torch.tensor(
                [self._answer_type_index[t] for t in answer_types], dtype=torch.long, device=device
            )
        )
        self.question_type.append(
            torch.tensor(
                [self._question_type_index.get(t, unknown_qtype) for t in qtypes],
                dtype=torch.long,
                device=device,
            )
        )
        unknown_family = len(self._family_index)
        families = [None] * n if question_families is None else question_families
        self.question_family.append(
            torch.tensor(
                [self._family_index.get(f, unknown_family) for f in families],
                dtype=torch.long,
                device=device,
            )
        )

    def _deduplicated(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
        """States with one row per question id (the first seen), sorted by id; None if empty:
        ids, accuracy, answer type, question type, question family."""
        if isinstance(self.question_id, list) and not self.question_id:
            return None
        ids = dim_zero_cat(self.question_id)
        if ids.numel() == 0:
            return None
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        positions = torch.arange(ids.numel(), device=ids.device)
        first = torch.full_like(unique_ids, ids.numel()).scatter_reduce_(
            0, inverse, positions, reduce="amin"
        )
        return (
            unique_ids,
            dim_zero_cat(self.accuracy)[first],
            dim_zero_cat(self.answer_type)[first],
            dim_zero_cat(self.question_type)[first],
            dim_zero_cat(self.question_family)[first],
        )

    def compute(self) -> dict[str, Tensor]:
        """Accuracy fractions in [0, 1]: "overall", each answer type seen,
        "question_type/<type>" for each question type seen and, when the metric tracks them,
        "family/<family>" for each question family seen (absent rather than NaN)."""
        states = self._deduplicated()
        if states is None:
            return {}
        _, acc, answer_type, question_type, question_family = states
        results = {"overall": acc.mean()}
        results |= _grouped_means(acc, answer_type, self.answer_types)
        if self.question_types is not None:
            names = (*self.question_types, UNKNOWN_QUESTION_TYPE)
            grouped = _grouped_means(acc, question_type, names)
            results |= {f"question_type/{name}": value for name, value in grouped.items()}
        if self.question_families is not None:
            names = (*self.question_families, UNKNOWN_FAMILY)
            grouped = _grouped_means(acc, question_family, names)
            results |= {FAMILY_PREFIX + name: value for name, value in grouped.items()}
        return results

    def per_question(self) -> dict[int, float]:
        """Question id -> accuracy fraction, each question once, gathered from all ranks."""
        with self.sync_context(should_sync=self.sync_on_compute):
            states = self._deduplicated()
        if states is None:
            return {}
        ids, acc, *_ = states
        return dict(zip(ids.tolist(), acc.tolist(), strict=True))

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        # A rank that saw no batch has empty list states, which torchmetrics replaces by an empty
        # tensor of the metric's default dtype (float32); gathering that against the int64/float64
        # tensors of the other ranks fails, so give empty states their real dtype first.
        for name, dtype in self._state_dtypes.items():
            state = getattr(self, name)
            if isinstance(state, list) and not state:
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)


class SoftScoreAccuracy(Metric):
    """VQA accuracy of the arg-max answer, read from the soft-score targets on the device.

    A target's soft score of an answer is that answer's official accuracy against the ten human
    answers (the same 0/.3/.6/.9/1 table), so the score at the arg-max is the official accuracy
    of the prediction without decoding it to a string: :class:`VQAAccuracy` needs the predicted
    ids on the host, a synchronisation every step. ``update`` never waits for the device. It
    agrees with :class:`VQAAccuracy` up to float32 rounding of the targets, except where the
    official tool skips normalisation (ten identical raw human answers), and it keeps running
    sums rather than one row per question id, so the repeated samples a ``DistributedSampler``
    pads with count twice: a training curve, not a reported result.

    ``compute`` returns "overall" and, for the answer types seen, their accuracy, like
    :class:`VQAAccuracy` (absent rather than NaN; empty before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score: Tensor
    count: Tensor
    type_score: Tensor
    type_count: Tensor

    def __init__(self, answer_types: Sequence[str] = ANSWER_TYPES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answer_types = tuple(answer_types)
        self._answer_type_index = {name: i for i, name in enumerate(self.answer_types)}
        n = len(self.answer_types)
        # float64 sums, int64 counts: an epoch of float32 additions would drift in the last digits
        self.add_state("score", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("type_score", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("type_count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        logits: Tensor,
        targets: Tensor,
        valid: Tensor | None = None,
        answer_types: Tensor | Sequence[str] | None = None,
    ) -> None:
        """``logits``/``targets`` [B, A]; ``valid`` [B] bool, False on padding rows, which do not
        count; ``answer_types`` [B] indices into the metric's answer types, or the names of the
        first rows (the real ones, when padding rows follow and ``valid`` marks them)."""
        if logits.shape != targets.shape:
            raise ValueError(
                f"SoftScoreAccuracy.update: logits {tuple(logits.shape)} and targets "
                f"{tuple(targets.shape)} differ"
            )
        rows = logits.shape[0]
        picked = targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).double()
        if valid is None:
            scores = picked
            self.count += rows
        else:
            # where, not a product: a NaN on a padding row must not reach the sums
            scores = torch.where(valid, picked, 0.0)
            self.count += valid.sum()
        self.score += scores.sum()
        if answer_types is None:
            return
        type_ids = self._type_ids(answer_types, rows, valid is not None, picked.device)
        one_hot = type_ids.unsqueeze(1) == torch.arange(
            len(self.answer_types), device=picked.device
        )
        if valid is not None:
            one_hot = one_hot & valid.unsqueeze(1)
        # a masked sum rather than index_add_: deterministic on CUDA (trainer=deterministic)
        self.type_score += torch.where(one_hot, scores.unsqueeze(1), 0.0).sum(dim=0)
        self.type_count += one_hot.sum(dim=0)

    def _type_ids(
        self, answer_types: Tensor | Sequence[str], rows: int, padded: bool, device: torch.device
    ) -> Tensor:
        if isinstance(answer_types, Tensor):
            return answer_types.to(device, non_blocking=True)
        unknown = sorted(set(answer_types) - self._answer_type_index.keys())
        if unknown:
            raise ValueError(f"unknown answer types {unknown}; expected one of {self.answer_types}")
        if len(answer_types) > rows or (len(answer_types) < rows and not padded):
            raise ValueError(
                f"SoftScoreAccuracy.update: {len(answer_types)} answer types for {rows} rows "
                "(fewer only with `valid` marking the padding rows after them)"
            )
        ids = [self._answer_type_index[t] for t in answer_types]
        ids += [0] * (rows - len(ids))  # padding rows: any type, `valid` leaves them out
        # Built on the host and copied without blocking: a blocking copy to a GPU waits for
        # every kernel queued before it.
        return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            return {}
        results = {"overall": self.score / self.count}
        for i, (score, count) in enumerate(
            zip(self.type_score, self.type_count.tolist(), strict=True)
        ):
            if count > 0:
                results[self.answer_types[i]] = score / count
        return results


class StepMean(MeanMetric):
    """A weighted mean whose ``update`` never waits for the device, for per-step values (losses).

    ``MeanMetric`` looks for NaNs with ``if nans.any()`` on every update, a host synchronisation;
    its ``nan_strategy="disable"`` skips that but (torchmetrics 1.9) also drops the weights, which
    would average batches of different sizes as equals. A NaN value still shows: the mean becomes
    NaN. Same states and arithmetic as ``MeanMetric`` otherwise, so checkpoints are unchanged.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(nan_strategy="disable", **kwargs)

    def update(self, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        """``value`` a tensor (or float) of values, ``weight`` one weight for them all or one
        each; a Python number stays a kernel argument (no host-to-device copy)."""
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        value = value.to(self.dtype)
        if isinstance(weight, Tensor):
            weight = torch.broadcast_to(weight.to(self.dtype), value.shape)
            self.weight += weight.sum()
        else:
            self.weight += weight * value.numel()
        self.mean_value += (value * weight).sum()


def _grouped_means(values: Tensor, groups: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """Mean of ``values`` per group index, keyed by name, for the groups that occur."""
    sums = torch.bincount(groups, weights=values, minlength=len(names))
    counts = torch.bincount(groups, minlength=len(names))
    present = (counts > 0).nonzero().flatten().tolist()
    return {names[i]: sums[i] / counts[i] for i in present}
