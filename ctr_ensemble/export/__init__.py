"""ONNX export of members and assembly of the Triton model repository."""
