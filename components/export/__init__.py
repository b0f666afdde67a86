"""Export of the model to ONNX graphs and TensorRT engines."""
