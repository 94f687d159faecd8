"""`vqa.optim` and the `optimizer` / `scheduler` config groups: the default composition steps
with exactly the LRs the module's former hard-coded recipe gave (transformers' cosine with
warm-up over the run's optimizer steps, group LRs scaled by the encoder multipliers), the
alternatives compose, train and follow the curve they claim, and wrong arguments fail early."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from tests.helpers import TINY_DATA_OVERRIDES, TINY_OVERRIDES, compose_config, fit_steps
from vqa.lit_module import VQALitModule
from vqa.optim import build_optimization, constant, cosine_warmup

ANSWERS = ["yes", "no", "2", "3", "red", "circle"]
VOCAB_SIZE = 40

# The quick-start's optimisation before it became config groups (module.optimizer.lr,
# module.warmup_fraction, ... in configs/experiment/quickstart.yaml and configs/train.yaml),
# and its length: 32 epochs of 188 optimizer steps.
QUICKSTART = {
    "lr": 2.0e-3,
    "weight_decay": 0.01,
    "encoder_lr_multiplier": 0.1,
    "text_lr_multiplier": 0.25,
    "warmup_fraction": 0.02,
    "min_lr_ratio": 0.01,
}
QUICKSTART_STEPS = 32 * 188


def make_module(cfg: DictConfig, **module_kwargs: Any) -> VQALitModule:
    torch.manual_seed(0)
    net = instantiate(cfg.model, num_answers=len(ANSWERS), vocab_size=VOCAB_SIZE)
    return instantiate(cfg.module, **module_kwargs)(net=net, answer_vocab=ANSWERS)


def configure(module: VQALitModule, total_steps: float) -> dict[str, Any]:
    module.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # type: ignore[assignment]
    return module.configure_optimizers()


def lr_curve(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[list[float]]:
    """Every group's LR at each of ``steps`` optimizer steps, then one past the end."""
    lrs = []
    for _ in range(steps + 1):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()  # no gradients: nothing moves, the scheduler sees a step
        scheduler.step()
    return lrs


def reference_quickstart_optimization(
    groups: list[dict[str, Any]], total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """The former VQALitModule.configure_optimizers, written out with the former arguments."""
    scales = {
        "visual": QUICKSTART["encoder_lr_multiplier"],
        "text": QUICKSTART["text_lr_multiplier"],
        "fusion_head": 1.0,
    }
    for group in groups:
        assert group["lr_scale"] == scales[group["name"].removesuffix("_no_decay")]
    optimizer = torch.optim.AdamW(
        groups, lr=QUICKSTART["lr"], weight_decay=QUICKSTART["weight_decay"], fused=None
    )
    for group in optimizer.param_groups:
        group["lr"] *= group["lr_scale"]
    total_steps = max(1, int(total_steps))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(QUICKSTART["warmup_fraction"] * total_steps),
        num_training_steps=total_steps,
        min_lr_rate=QUICKSTART["min_lr_ratio"],
    )
    return optimizer, scheduler


def without_params(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


# ----------------------------------------------------------------------------- the default


@pytest.mark.parametrize("total_steps", [QUICKSTART_STEPS, 49, 1])
def test_quickstart_steps_with_the_former_lrs_at_every_step(
    tmp_path: Path, total_steps: int
) -> None:
    # the visual encoder trainable here (the quick-start freezes it) so its group is checked too
    cfg = compose_config("train", ["experiment=quickstart", "model.visual.freeze=none"], tmp_path)
    assert cfg.module.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.module.scheduler._target_ == "vqa.optim.cosine_warmup"

    config = configure(make_module(cfg), total_steps)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    reference_optimizer, reference_scheduler = reference_quickstart_optimization(
        make_module(cfg).parameter_groups(), total_steps
    )

    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults == reference_optimizer.defaults
    # same groups (names, multipliers, weight decay, peak LRs), same parameters in each
    assert without_params(optimizer) == without_params(reference_optimizer)
    assert [[p.shape for p in g["params"]] for g in optimizer.param_groups] == [
        [p.shape for p in g["params"]] for g in reference_optimizer.param_groups
    ]
    peaks = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert set(peaks) == {
        f"{owner}{suffix}"
        for owner in ("visual", "text", "fusion_head")
        for suffix in ("", "_no_decay")
    }
    assert peaks["fusion_head"] == QUICKSTART["lr"]
    assert peaks["visual"] == QUICKSTART["lr"] * QUICKSTART["encoder_lr_multiplier"]
    assert peaks["text"] == QUICKSTART["lr"] * QUICKSTART["text_lr_multiplier"]

    curve = lr_curve(optimizer, scheduler, total_steps)
    assert curve == lr_curve(reference_optimizer, reference_scheduler, total_steps)  # bit for bit
    assert scheduler.state_dict() == reference_scheduler.state_dict()


def test_quickstart_config_holds_the_former_values(tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert cfg.optimizer.lr == QUICKSTART["lr"]
    assert cfg.optimizer.weight_decay == QUICKSTART["weight_decay"]
    assert cfg.optimizer.fused is None
    assert cfg.module.encoder_lr_multiplier == QUICKSTART["encoder_lr_multiplier"]
    assert cfg.module.text_lr_multiplier == QUICKSTART["text_lr_multiplier"]
    assert cfg.scheduler.warmup_fraction == QUICKSTART["warmup_fraction"]
    assert cfg.scheduler.min_lr_ratio == QUICKSTART["min_lr_ratio"]


def test_former_module_keys_fail_loudly(tmp_path: Path) -> None:
    for old in ("module.warmup_fraction=0.1", "module.min_lr_ratio=0.1", "module.optimizer.lr=1"):
        with pytest.raises(Exception, match="Could not override"):
            compose_config("train", [old], tmp_path)


# ----------------------------------------------------------------------------- the schedules


def test_cosine_warmup_curve() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    total, warmup, floor = 20, 5, 0.1
    curve = [
        lrs[0] for lrs in lr_curve(optimizer, cosine_warmup(optimizer, total, 0.25, floor), total)
    ]
    assert curve[: warmup + 1] == pytest.approx([2.0 * s / warmup for s in range(warmup + 1)])
    for step in range(warmup, total + 1):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert curve[step] == pytest.approx(2.0 * (floor + (1 - floor) * cosine))
    assert curve[total] == pytest.approx(2.0 * floor)


@pytest.mark.parametrize("warmup_fraction", [0.0, 0.3])
def test_constant_curve(warmup_fraction: float) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    total = 10
    warmup = int(warmup_fraction * total)
    curve = [
        lrs[0] for lrs in lr_curve(optimizer, constant(optimizer, total, warmup_fraction), total)
    ]
    expected = [0.5 * min(1.0, s / warmup) if warmup else 0.5 for s in range(total + 1)]
    assert curve == pytest.approx(expected)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["scheduler.warmup_fraction=1.5"], "scheduler.warmup_fraction"),
        (["scheduler.min_lr_ratio=-0.1"], "scheduler.min_lr_ratio"),
        (["scheduler=constant", "scheduler.warmup_fraction=-1"], "scheduler.warmup_fraction"),
    ],
)
def test_schedule_arguments_out_of_range_fail_when_the_module_is_made(
    tmp_path: Path, overrides: list[str], key: str
) -> None:
    cfg = compose_config("train", [*TINY_OVERRIDES, *overrides], tmp_path)
    with pytest.raises(ValueError, match=rf"{key} must lie in \[0, 1\]"):
        make_module(cfg)


def test_build_optimization_needs_a_finite_run_only_for_a_schedule() -> None:
    def groups() -> list[dict[str, Any]]:
        return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}]

    with pytest.raises(
        ValueError, match=r"finite run: set trainer\.max_epochs or trainer\.max_steps"
    ):
        build_optimization(groups(), torch.optim.SGD, cosine_warmup, float("inf"))
    built = build_optimization(
        groups(), lambda params: torch.optim.SGD(params, lr=1.0), None, math.inf
    )
    assert set(built) == {"optimizer"} and built["optimizer"].param_groups[0]["lr"] == 0.5


# ----------------------------------------------------------------------------- the alternatives


class LRProbe(pl.Callback):
    """Each group's LR at every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})


def test_sgd_with_constant_schedule_composes_and_trains(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    lr, steps = 0.05, 4
    cfg = compose_config(
        "train",
        [
            *TINY_OVERRIDES,
            *TINY_DATA_OVERRIDES,
            "optimizer=sgd",
            f"optimizer.lr={lr}",
            "scheduler=constant",
            "scheduler.warmup_fraction=0.5",
            "module.encoder_lr_multiplier=0.2",
        ],
        tmp_path,
        shared_data_dir,
    )
    probe = LRProbe()
    pl.seed_everything(cfg.seed, verbose=False)
    before = {k: v.clone() for k, v in make_module(cfg).net.state_dict().items()}
    trainer, module = fit_steps(cfg, [probe], max_steps=steps)

    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    assert trainer.global_step == steps == len(probe.lrs)
    total = int(trainer.estimated_stepping_batches)
    assert total == steps
    warmup = int(0.5 * total)
    for step, group_lrs in enumerate(probe.lrs):
        factor = min(1.0, step / warmup)
        assert group_lrs["fusion_head"] == pytest.approx(lr * factor)
        assert group_lrs["visual"] == pytest.approx(lr * 0.2 * factor)
        assert group_lrs["text_no_decay"] == pytest.approx(lr * 0.2 * factor)
    assert probe.lrs[-1]["fusion_head"] == pytest.approx(lr)  # and there it stays
    after = module.net.state_dict()
    assert any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )
