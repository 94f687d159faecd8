"""Build the callback and logger collections of a config (each entry is a `_target_` node)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger


def _instantiate_each(group: DictConfig | None, name: str) -> list:
    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"`{name}` must be a mapping of name -> config, got {type(group).__name__}")
    return [
        instantiate(node)
        for node in group.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def instantiate_callbacks(callbacks: DictConfig | None) -> list[Callback]:
    return _instantiate_each(callbacks, "callbacks")


def instantiate_loggers(loggers: DictConfig | None) -> list[Logger]:
    return _instantiate_each(loggers, "logger")
