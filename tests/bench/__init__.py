"""Benchmarks: frames per second for each pipeline stage on the synthetic clip (``make bench``)."""
