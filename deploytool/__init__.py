"""deploytool: PyTorch checkpoint -> pruned, distilled, quantized ONNX, verified against the original."""

__version__ = "0.1.0"
