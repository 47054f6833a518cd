"""Model export: ``dynaseg export --format onnx`` (``onnx.export_onnx``) and the onnxruntime predictor
(``onnx_runtime.OnnxPredictor``). Both need the optional ``export`` extra (onnx, onnxruntime)."""

from __future__ import annotations

__all__ = ["export_onnx", "OnnxPredictor"]


def __getattr__(name: str):
    # Lazy, so that importing the package does not import torch's exporter or onnxruntime.
    if name == "export_onnx":
        from dynaseg.export.onnx import export_onnx

        return export_onnx
    if name == "OnnxPredictor":
        from dynaseg.export.onnx_runtime import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'dynaseg.export' has no attribute {name!r}")
