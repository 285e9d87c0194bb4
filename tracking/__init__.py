"""Multi-object tracking: a norfair adapter that fills ``track_id`` in ``Detections``; pure CPU, no I/O."""
