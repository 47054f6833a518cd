"""The exception types that mean "the user's input is wrong": the CLI prints them as one line."""
from __future__ import annotations

from dynaseg.config.overrides import ConfigError
from dynaseg.data.coco import DatasetError
from dynaseg.data.image_io import ImageReadError
from dynaseg.engine.checkpoint import CheckpointError
from dynaseg.engine.distributed import PeerRankFailed
from dynaseg.evaluation.coco import EvaluationError

__all__ = ["USER_ERRORS"]

# FloatingPointError: the trainer's non-finite loss / gradient stop (names the term and iteration).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, ImageReadError, CheckpointError,
                                            EvaluationError, FileNotFoundError, FloatingPointError, PeerRankFailed)
