"""`compile=`: torch.compile of the network, refused where CUDA graphs would meet changing shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config, fit_steps
from vqa.models.compilation import compile_network


def test_cuda_graph_modes_need_static_shapes() -> None:
    with pytest.raises(ValueError, match=r"data\.static_shapes"):
        compile_network(torch.nn.Linear(2, 2), "reduce-overhead", static_shapes=None)
    with pytest.raises(ValueError, match="one of"):
        compile_network(torch.nn.Linear(2, 2), "fast", static_shapes=None)


def test_compiled_network_keeps_its_state_dict_keys() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    keys = list(net.state_dict())
    compile_network(net, "default")
    assert list(net.state_dict()) == keys  # checkpoints load into an eager model


def _train_losses(tmp_path: Path, data_dir: Path, *overrides: str) -> list[float]:
    """Training losses of a few steps of the tiny composition, static shapes, dropout on."""
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            "data.static_shapes={questions: 8}",
            "data.batch_size=8",
            *overrides,
        ],
        tmp_path,
        data_dir,
    )
    GlobalHydra.instance().clear()
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    fit_steps(cfg, [Record()], max_steps=3, limit_val_batches=2)
    return losses


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, shared_data_dir: Path) -> None:
    """The compiled network trains on the same losses as the eager one (float tolerance: the
    compiler fuses and reorders reductions), validation included (its own, dynamic shapes).
    Without randomness: a compiled graph draws its dropout masks in another order than eager
    (from the same generator with ``fallback_random``), so every later draw would differ. In
    float64: a ResNet trained from scratch on batches of eight amplifies float32 reordering
    through its batch norms to differences of a percent after one step, in both directions."""
    no_dropout = [
        "trainer.precision=64-true",
        "module.image_dropout=0",
        "module.question_dropout=0",
        "head.dropout=0",
        "fusion.attention_dropout=0",
        "++model.text.config.hidden_dropout_prob=0",
        "++model.text.config.attention_probs_dropout_prob=0",
    ]
    torch._dynamo.reset()
    eager = _train_losses(tmp_path / "eager", shared_data_dir, *no_dropout)
    compiled = _train_losses(tmp_path / "compiled", shared_data_dir, *no_dropout, "compile=default")
    torch._dynamo.reset()
    assert len(eager) == len(compiled) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
