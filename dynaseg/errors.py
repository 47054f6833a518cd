"""The exception types that mean "the user's input is wrong": the CLI prints them as one line."""
from __future__ import annotations

from dynaseg.config.overrides import ConfigError
from dynaseg.data.coco import DatasetError
from dynaseg.data.image_io import ImageReadError
from dynaseg.engine.checkpoint import CheckpointError
from dynaseg.evaluation.coco import EvaluationError

__all__ = ["USER_ERRORS"]

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, ImageReadError, CheckpointError,
                                            EvaluationError, FileNotFoundError)
