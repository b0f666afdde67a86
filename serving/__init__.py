"""Batch serving: the model's sampling loop on PyTorch, ONNX Runtime or TensorRT networks
(`backends`), one `Generator` over them (`generator`), and `blipdiff batch` from a manifest
(`batch`)."""
