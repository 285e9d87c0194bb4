"""Sign detector: finds candidate signs in whole frames (ONNX Runtime / TensorRT backends, HTTP service)."""
