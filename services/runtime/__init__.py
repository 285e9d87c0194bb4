"""Model runtimes shared by the services' backends (ONNX Runtime). Imports only ``services.common``."""
