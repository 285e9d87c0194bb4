"""Sign classifier: names the sign in a crop. Serving in ``api``/``onnx``, training in ``train``."""
