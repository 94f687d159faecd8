"""Small glue between Hydra configs and Lightning objects."""

from vqa.utils.instantiators import (
    drop_logger_only_callbacks,
    instantiate_callbacks,
    instantiate_loggers,
)
from vqa.utils.project import apply_extras, set_project_root
from vqa.utils.rich_config import print_config_tree

__all__ = [
    "apply_extras",
    "drop_logger_only_callbacks",
    "instantiate_callbacks",
    "instantiate_loggers",
    "print_config_tree",
    "set_project_root",
]
