"""Tracking: detections of one frame after another become one track per physical sign (norfair adapter)."""
