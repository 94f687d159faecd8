"""`vqa.utils.op_counter`: what it counts as a host synchronisation, what it does not, and that
the training step this project used to run (answers decoded to strings, torchmetrics' NaN
check, a branch on the CE labels) would have been caught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from tests.test_host_syncs import (
    DROPOUT,
    FOREACH,
    StepCounterReads,
    count_one_training_batch,
    syncs_besides,
)
from vqa.data.batch import VQABatch
from vqa.lit_module import VQALitModule
from vqa.utils.op_counter import count_ops


def test_sync_free_ops_count_kernels_and_no_sync() -> None:
    x = torch.randn(8, 5, requires_grad=True)
    targets = torch.rand(8, 5)
    valid = torch.arange(8) < 6
    with count_ops() as counted:
        picked = targets.gather(1, x.argmax(1, keepdim=True)).squeeze(1)
        masked = torch.where(valid, picked, 0.0).sum() / valid.sum().clamp(min=1)
        loss = F.binary_cross_entropy_with_logits(x, targets, reduction="sum") + masked
        loss.backward()
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
        x.detach().to("cpu")  # already there: not a copy to the host
    assert counted.host_syncs == 0, (counted.syncs, counted.host_reads)
    assert counted.kernels > 10
    assert counted.ops["aten.gather"] == 1


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        ("nonzero", lambda t: t.nonzero(), "aten.nonzero"),
        ("boolean indexing", lambda t: t[t > 0], "aten.index"),
        ("masked_select", lambda t: t.masked_select(t > 0), "aten.masked_select"),
        ("unique", lambda t: torch.unique(t), "aten._unique2"),
        (
            "repeat_interleave without output_size",
            lambda t: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3])),
            "aten.repeat_interleave",
        ),
        ("bool of a tensor", lambda t: bool((t > 0).any()), "aten._local_scalar_dense"),
        ("item", lambda t: t.sum().item(), "aten._local_scalar_dense"),
    ],
)
def test_each_kind_of_sync_is_counted(name: str, step: Any, expected: str) -> None:
    t = torch.randn(6)
    with count_ops() as counted:
        step(t)
    assert counted.syncs[expected] >= 1, (name, counted.syncs)
    assert counted.host_syncs >= 1


@pytest.mark.parametrize("method", ["item", "tolist", "cpu", "numpy"])
def test_python_reads_of_a_tensor_are_counted(method: str) -> None:
    t = torch.tensor([1.0]) if method == "item" else torch.randn(3)
    before = getattr(torch.Tensor, method)
    with count_ops() as counted:
        getattr(t, method)()
    assert counted.host_reads[f"Tensor.{method}"] == 1
    assert counted.host_syncs >= 1
    assert getattr(torch.Tensor, method) is before  # unpatched on the way out


def test_the_old_step_s_sync_points_are_counted() -> None:
    """What the training step did before: each is counted."""
    logits, targets = torch.randn(4, 6), torch.rand(4, 6)
    vocab = [str(i) for i in range(6)]

    with count_ops() as decoding:  # predictions decoded for the string-level accuracy
        [vocab[i] for i in logits.argmax(dim=1).tolist()]
    assert decoding.host_reads["Tensor.tolist"] == 1

    with count_ops() as nan_check:  # torchmetrics' default nan_strategy
        MeanMetric().update(torch.tensor(0.5), weight=4)
    assert nan_check.syncs["aten._local_scalar_dense"] >= 1

    with count_ops() as branch:  # `if not in_vocab.any()` before cross-entropy
        in_vocab = targets.amax(dim=1) > 0
        if not in_vocab.any():
            pass
        F.cross_entropy(logits[in_vocab], targets.argmax(dim=1)[in_vocab])
    assert branch.syncs["aten._local_scalar_dense"] == 1
    assert branch.syncs["aten.index"] == 2


def test_a_syncing_training_step_is_caught(
    tmp_path: Path, shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The harness of tests/test_host_syncs.py sees inside `training_step`: a step that decodes
    its predictions to strings, as the old train accuracy did, is reported."""
    original = VQALitModule.training_step

    def decoding_step(self: VQALitModule, batch: VQABatch, batch_idx: int) -> Any:
        loss = original(self, batch, batch_idx)
        self.decode(self(batch).logits.detach())
        return loss

    monkeypatch.setattr(VQALitModule, "training_step", decoding_step)
    step_counts = StepCounterReads(monkeypatch)
    counted = count_one_training_batch(tmp_path, shared_data_dir, [*DROPOUT, FOREACH])
    assert syncs_besides(counted, step_counts.reads) == {"Tensor.tolist": 1}
