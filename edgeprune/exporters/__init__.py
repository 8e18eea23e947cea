"""ONNX export, numerical validation, sparse initializers, graph optimisation and INT8 quantization."""
