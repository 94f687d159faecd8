"""Every option of every config group composes, and instantiates what it contributes.

The options are globbed from `configs/`, so a new yaml file is tested with no edit here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from tests.helpers import CONFIG_DIR, ROOT, TINY_OVERRIDES, compose_config
from vqa.data.tokenizer import TokenizerSpec, tokenizer_spec

GROUPS = [
    "data",
    "model/visual",
    "model/text",
    "fusion",
    "combiner",
    "head",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "experiment",
    "hparams_search",
]
# Options that need the network (hub weights): they must compose and fail fast offline.
NEEDS_HUB = {("model/text", "bert_base_uncased"), ("model/visual", "resnet101_imagenet")}
# Overrides a group option needs to compose here (mandatory paths).
REQUIRED = {("data", "vqav2"): ["data.root=/nonexistent/vqa"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def all_targets(node) -> list[str]:
    """Every `_target_` in a config tree."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append(node._target_)
        for key in node:
            found += all_targets(node._get_node(key))
    elif isinstance(node, ListConfig):
        for item in node:
            found += all_targets(item)
    return found


def test_every_group_has_options() -> None:
    for group in GROUPS:
        if group != "hparams_search":
            assert options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    composed = compose_config("train", overrides, tmp_path)
    # resolved copy without the (read-only) hydra node, as vqa.cli.train sees it
    cfg = OmegaConf.create(
        {
            key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            for key, node in composed.items()
            if key != "hydra"
        }
    )
    # every _target_ anywhere in the composed tree must be importable
    for target in all_targets(cfg):
        assert callable(get_method(target)), target

    if group in ("trainer", "debug", "experiment", "hparams_search"):
        cfg.trainer.accelerator = "cpu"  # GPU presets are checked for structure on CPU CI
        cfg.trainer.devices = 1 if cfg.trainer.get("strategy") in (None, "auto") else 2
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer, pl.Trainer)
    if group in ("callbacks", "debug", "experiment") and cfg.get("callbacks"):
        for node in cfg.callbacks.values():
            if node:
                assert isinstance(instantiate(node), pl.Callback)
    if group == "logger" and cfg.get("logger"):
        for node in cfg.logger.values():
            assert isinstance(instantiate(node), pl.loggers.Logger)
    if group == "fusion":
        block = instantiate(cfg.fusion)(visual_channels=[64, 128], text_dim=32)
        assert block.out_dim > 0
    if group == "combiner":
        combiner = instantiate(cfg.combiner)(in_features=48, num_streams=2)
        assert combiner(torch.randn(3, 2, 48)).shape == (3, combiner.out_dim)
    if group in ("optimizer", "scheduler"):
        optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(3))])
        scheduler = instantiate(cfg.scheduler)(optimizer, 10)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    if group == "head":
        head = instantiate(cfg.head)(in_features=48, num_answers=7)
        assert sum(p.numel() for p in head.parameters()) > 0
    if group == "model/visual":
        if (group, option) in NEEDS_HUB:
            return  # covered by the offline fail-fast tests of the encoders
        encoder = instantiate(cfg.model.visual)
        assert len(encoder.out_channels) == len(cfg.model.visual.stages)
    if group == "model/text":
        if (group, option) in NEEDS_HUB:
            with pytest.raises(Exception, match=r"(?i)offline|download|cache|hub"):
                instantiate(cfg.model.text)(vocab_size=30522)
            return
        encoder = instantiate(cfg.model.text)(vocab_size=100)
        assert encoder.hidden_size > 0
    if group == "data":
        datamodule = instantiate(cfg.data)
        assert isinstance(datamodule, pl.LightningDataModule)


def test_default_composition_is_the_product_card(tmp_path: Path) -> None:
    # no stand-in run folder (tmp_path=None): hydra.run.dir shows its own default
    cfg = compose_config("train", [f"paths.log_dir={tmp_path}"])
    assert cfg.model.visual.arch == "resnet101"
    assert "bert" in cfg.model.text._target_.lower()
    assert cfg.trainer.gradient_clip_val == 5.0
    assert cfg.module.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.module.scheduler._target_ == "vqa.optim.cosine_warmup"
    assert cfg.hydra.run.dir.startswith(f"{cfg.paths.log_dir}/quickstart/runs/")
    assert cfg.hydra.sweep.dir.startswith(f"{cfg.paths.log_dir}/quickstart/multiruns/")
    assert OmegaConf.to_yaml(cfg.hydra.sweep).count("subdir: ${hydra.job.num}") == 1


def resolved(cfg: DictConfig, *drop: str) -> dict:
    """The composed config as the run sees it, without the hydra node and the ``drop`` keys."""
    return {
        key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        for key, node in cfg.items()
        if key not in ("hydra", *drop)
    }


def test_default_composition_is_the_quickstart(tmp_path: Path) -> None:
    default = compose_config("train", [], tmp_path)
    quickstart = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert resolved(default) == resolved(quickstart)
    assert default.hydra.runtime.choices == quickstart.hydra.runtime.choices
    assert default.hydra.runtime.choices.experiment == "quickstart"
    # the same default for the feature extractor, so it writes the store train.py reads
    extract = compose_config("extract_features", [], tmp_path)
    assert resolved(extract, "task_name", "extract") == resolved(quickstart, "task_name")


def test_quickstart_reads_layer1_at_128px_in_patches(tmp_path: Path) -> None:
    """The quick-start is film over layer1's 128 px map read in 2 x 2 patches, with one context
    layer over the cells: the recipe the README measured, and its block sees a 16 x 16 grid."""
    quickstart = compose_config("train", [], tmp_path)
    command = compose_config(
        "train",
        [
            "data.image_size=128",
            "fusion=film",
            "fusion.grid_stride=2",
            "fusion.cell_context=1",
            "trainer.max_epochs=14",
        ],
        tmp_path,
    )
    assert resolved(quickstart) == resolved(command)
    block = instantiate(quickstart.fusion)(visual_channels=[256], text_dim=32).eval()
    assert len(block.context) == 1
    text, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    out = block([torch.randn(2, 256, 32, 32)], text, mask)
    assert out.attention["image"].shape == (2, 16, 16)


@pytest.mark.parametrize("fusion", sorted(p.stem for p in (CONFIG_DIR / "fusion").glob("*.yaml")))
def test_every_block_runs_on_the_quickstart_with_its_preset(tmp_path: Path, fusion: str) -> None:
    """`python train.py fusion=<block>`: each block composes on the quick-start's 128 px layer1
    map with its preset from fusion_preset/ (if any) and no other experiment's."""
    cfg = compose_config("train", [f"fusion={fusion}"], tmp_path)
    preset = CONFIG_DIR / "fusion_preset" / f"quickstart_{fusion}.yaml"
    for key, value in (OmegaConf.load(preset) if preset.exists() else {}).items():
        assert cfg.fusion[key] == value
    block = instantiate(cfg.fusion)(visual_channels=[256], text_dim=32).eval()
    text, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    out = block([torch.randn(2, 256, 32, 32)], text, mask)
    assert out.features.shape == (2, block.out_dim)
    grid = (16, 16) if cfg.fusion.get("grid_stride", 1) == 2 else (32, 32)
    image_maps = [m for key, m in out.attention.items() if key.startswith("image")]
    assert image_maps and all(m.shape[-2:] == grid for m in image_maps)
    # the presets are the quick-start's: the VQA v2 recipe keeps the block's own defaults
    vqav2 = compose_config(
        "train", ["experiment=vqav2_resnet101_bert", f"fusion={fusion}", "data.root=."], tmp_path
    )
    assert vqav2.fusion.get("grid_stride", 1) == 1


def test_a_fusion_without_experiment_is_the_quickstart_with_that_block(tmp_path: Path) -> None:
    """`python train.py fusion=parallel`: the quick-start's data, features, encoders, head and
    schedule, and its fusion keys (hidden_dim, the block's preset) on the parallel block."""
    parallel = compose_config("train", ["fusion=parallel"], tmp_path)
    explicit = compose_config("train", ["experiment=quickstart", "fusion=parallel"], tmp_path)
    quickstart = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert resolved(parallel) == resolved(explicit)
    assert parallel.fusion._target_.endswith("ParallelCoAttention")
    assert quickstart.hydra.runtime.choices.fusion == "film"
    assert parallel.fusion.hidden_dim == quickstart.fusion.hidden_dim == 128  # not parallel.yaml's
    assert parallel.fusion.grid_stride == 2
    assert parallel.fusion.cell_conditioning and parallel.fusion.count
    same = resolved(parallel, "fusion", "model")
    assert same == resolved(quickstart, "fusion", "model")
    assert parallel.model.visual == quickstart.model.visual
    assert parallel.model.text == quickstart.model.text
    assert parallel.data.features == "cached" and parallel.model.visual.stages == ["layer1"]


def test_the_vqav2_recipe_composes_nothing_of_the_quickstart(tmp_path: Path) -> None:
    cfg = compose_config("train", ["experiment=vqav2_resnet101_bert"], tmp_path)
    choices = cfg.hydra.runtime.choices
    assert choices.experiment == "vqav2_resnet101_bert"
    assert choices.data == "vqav2"
    assert choices["model/visual"] == "resnet101_imagenet"
    assert choices["model/text"] == "bert_base_uncased"
    assert choices.fusion == "parallel"
    assert (choices.trainer, choices.logger) == ("gpu", "many_loggers")
    assert cfg.task_name == "vqav2_resnet101_bert"
    assert cfg.data.image_size == 448 and cfg.data.features == "images"
    visual = cfg.model.visual
    assert visual.weights == "IMAGENET1K_V2" and list(visual.stages) == ["layer3", "layer4"]
    assert (visual.freeze, visual.bn, visual.init_seed) == ("layer1", "frozen", None)
    assert cfg.model.text.name_or_path == "bert-base-uncased" and cfg.model.text.config is None
    assert (cfg.fusion.hidden_dim, cfg.head.hidden_dim, cfg.head.norm) == (1024, 2048, "layer")
    assert (cfg.module.image_dropout, cfg.module.question_dropout) == (0.1, 0.1)
    assert cfg.module.text_lr_multiplier is None
    assert (cfg.optimizer.lr, cfg.scheduler.warmup_fraction) == (3.0e-4, 0.05)
    assert cfg.trainer.max_epochs == 13 and cfg.trainer.precision == "bf16-mixed"


def test_the_text_encoder_config_chooses_the_tokenizer(tmp_path: Path) -> None:
    """No data config names a tokenizer: the text encoder's ``name_or_path`` decides, so one
    override changes the encoder and its tokenizer together."""
    pretrained = compose_config("train", ["model/text=bert_base_uncased"], tmp_path)
    assert "tokenizer_name" not in pretrained.data
    assert tokenizer_spec(pretrained.model.text) == TokenizerSpec("bert-base-uncased")
    folder = compose_config("train", ["model.text.name_or_path=/models/my-bert"], tmp_path)
    assert tokenizer_spec(folder.model.text).name_or_path == "/models/my-bert"
    quickstart = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert tokenizer_spec(quickstart.model.text).built_from_questions
    with pytest.raises(ConfigCompositionException, match="tokenizer_name"):
        compose_config("train", ["data.tokenizer_name=bert-base-uncased"], tmp_path)


def test_eval_config_requires_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config("eval", [], tmp_path)
    with pytest.raises(MissingMandatoryValue, match="ckpt_path"):
        _ = cfg.ckpt_path


def test_wrong_override_type_fails_at_compose_time(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="max_epochs"):
        compose_config("train", ["trainer.max_epochs=abc"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="fusion"):
        compose_config("train", ["fusion=nope"], tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_prints_job_config() -> None:
    result = run_cli("--cfg", "job", "fusion=parallel")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.fusion._target_.endswith("ParallelCoAttention")
    assert printed.model.visual.arch == "resnet101"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fusion=nope", "Could not find 'fusion/nope'"),
        ("trainer.max_epochs=abc", "max_epochs"),
    ],
)
def test_cli_rejects_wrong_override(override: str, message: str) -> None:
    result = run_cli("--cfg", "job", override)
    assert result.returncode != 0
    assert message in result.stderr


def test_tiny_overrides_compose(tmp_path: Path) -> None:
    cfg = compose_config("train", TINY_OVERRIDES, tmp_path)
    assert cfg.model.visual.arch == "resnet18"
    # the bare base, not the default quick-start ...
    assert cfg.hydra.runtime.choices.experiment == "none"
    assert cfg.task_name == "train" and list(cfg.model.visual.stages) == ["layer3", "layer4"]
    # ... unless an experiment follows them: the last choice of a group wins
    quickstart = compose_config("train", [*TINY_OVERRIDES, "experiment=quickstart"], tmp_path)
    assert quickstart.task_name == "quickstart" and quickstart.model.visual.arch == "resnet18"
    assert list(quickstart.model.visual.stages) == ["layer1"]
