"""Where the project lives, composing its configs outside `@hydra.main`, and the run-wide
switches of the `extras` config node."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vqa.config_schema import register_schemas
from vqa.utils.rich_config import print_config_tree

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

# The smallest real composition, for smoke runs (tests, `benchmark.py --quick`): train.yaml's bare
# base, not its default quick-start preset, with ResNet-18 stages at 32 px, a two-layer BERT, a
# small fusion and head ... A preset chosen after this list replaces `experiment=none` (Hydra takes
# the last choice of a group); one chosen before it is replaced by it.
TINY_MODEL_OVERRIDES: list[str] = [
    "experiment=none",
    "model/visual=resnet18",
    "model/text=bert_tiny",
    "fusion.hidden_dim=32",
    "head.hidden_dim=32",
]
# ... on a synthetic set small enough to generate in about a second. One list for every user, so
# they all find the same generated set in a shared data folder.
TINY_DATA_OVERRIDES: list[str] = [
    "data.source.num_train_images=8",
    "data.source.num_val_images=4",
    "data.source.num_test_images=2",
    "data.source.questions_per_image=4",
    "data.source.image_size=32",
    "data.image_size=32",
    "data.num_workers=0",
    "data.batch_size=8",  # two whole images per grouped batch: BatchNorm needs more than one
]


def set_project_root() -> Path:
    """Anchor `paths.root_dir` (data/, logs/) at the checkout, whatever the working directory.

    An explicit PROJECT_ROOT in the environment wins, so installed copies can point elsewhere.
    """
    return Path(os.environ.setdefault("PROJECT_ROOT", str(CONFIG_DIR.parent)))


def compose_run_config(
    config_name: str = "train", overrides: Sequence[str] = (), output_dir: Path | None = None
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``overrides`` as the command line would,
    for code that runs a job without ``@hydra.main`` (tests, benchmarks).

    ``overrides`` are Hydra's, with Hydra's rules: of several choices of one config group the
    last wins, so ``[*TINY_MODEL_OVERRIDES, "experiment=quickstart"]`` is the quick-start at tiny
    sizes, while ``["experiment=quickstart", *TINY_MODEL_OVERRIDES]`` is the bare base
    (``experiment=none``) at tiny sizes. Value overrides (``fusion.hidden_dim=32``) apply after
    every chosen file, wherever they stand in the list.

    ``output_dir`` stands in for the run folder Hydra would create. A ``HydraConfig`` is set,
    as in a real run, so ``${hydra:...}`` interpolations resolve.
    """
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


# Known-noisy third-party messages, each named, silenced by ``extras.ignore_warnings``. Nothing
# here may concern a run's correctness (e.g. Lightning's "not resumable" warning must show): a
# blanket filter on whole libraries once hid exactly such a warning.
KNOWN_NOISY_WARNINGS: tuple[str, ...] = (
    # Lightning calls a torch pytree API that newer torch deprecates; nothing for users to do.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning's hint on machines with few cores; workers are a data config choice.
    r"The '\w+' does not have many workers",
    # Small synthetic epochs are shorter than the logging interval: epoch-level logs still come.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


def silence_known_noise() -> None:
    for message in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def check_output_dir(cfg: DictConfig) -> None:
    """Every file of a job goes to one folder: refuse a `paths.output_dir` that Hydra's run
    folder does not follow (a multirun, whose jobs would all write into that one folder)."""
    if not HydraConfig.initialized() or "paths" not in cfg or "output_dir" not in cfg.paths:
        return
    hydra_dir = HydraConfig.get().runtime.output_dir
    if os.path.realpath(cfg.paths.output_dir) != os.path.realpath(hydra_dir):
        raise ValueError(
            f"paths.output_dir={cfg.paths.output_dir} but this job's Hydra folder is {hydra_dir}: "
            "in a multirun every job would write into the same folder. Set "
            "hydra.sweep.dir=<folder> instead (each job gets a numbered subfolder)."
        )


def apply_extras(cfg: DictConfig) -> None:
    check_output_dir(cfg)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        silence_known_noise()
    if extras.get("print_config"):
        print_config_tree(cfg)
