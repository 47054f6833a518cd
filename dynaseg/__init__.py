"""dynaseg: fast, high-quality instance and panoptic segmentation."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import dynaseg` (and `dynaseg config`) stays cheap.
    if name == "Predictor":
        from dynaseg.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'dynaseg' has no attribute {name!r}")
