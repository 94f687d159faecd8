"""Build the callback and logger collections of a config (each entry is a `_target_` node)."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import DeviceStatsMonitor, LearningRateMonitor
from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

# Callbacks whose only output is logged metrics: Lightning refuses them on a Trainer without a
# logger (MisconfigurationException at setup), although running without one is an ordinary choice.
LOGGER_ONLY_CALLBACKS: tuple[type[Callback], ...] = (LearningRateMonitor, DeviceStatsMonitor)


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


def drop_logger_only_callbacks(callbacks: list[Callback], loggers: list[Logger]) -> list[Callback]:
    """Without a logger, the callbacks that only feed one step aside (one log line each)."""
    if loggers:
        return callbacks
    kept = []
    for cb in callbacks:
        if isinstance(cb, LOGGER_ONLY_CALLBACKS):
            log.info(
                "No logger configured: %s has nothing to log to and is not used.", type(cb).__name__
            )
        else:
            kept.append(cb)
    return kept
