"""Print the composed config as a rich tree, main groups first (Hydra saves it in .hydra/)."""

from __future__ import annotations

from collections.abc import Sequence

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

DEFAULT_ORDER = (
    "data",
    "model",
    "fusion",
    "head",
    "module",
    "callbacks",
    "logger",
    "trainer",
    "paths",
)


def print_config_tree(cfg: DictConfig, order: Sequence[str] = DEFAULT_ORDER) -> None:
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    fields = [f for f in order if f in cfg] + [f for f in cfg if f not in order]
    for name in fields:
        node = cfg[name]
        text = OmegaConf.to_yaml(node, resolve=False) if isinstance(node, DictConfig) else str(node)
        tree.add(str(name), style="dim", guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
