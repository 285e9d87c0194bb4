"""Video decoding (PyAV): recordings in, ``Frame``s out."""
