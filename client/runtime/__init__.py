"""On-device runtime: snapshot inference with onnxruntime and numpy, and the update agent (no torch, no flwr)."""
