"""The 43 GTSRB / GTSDB sign classes, by id."""

from __future__ import annotations

__all__ = ["GTSRB_CLASS_NAMES", "NOT_A_SIGN", "NUM_SIGN_CLASSES", "UNKNOWN"]

GTSRB_CLASS_NAMES: tuple[str, ...] = (
    "speed_limit_20",
    "speed_limit_30",
    "speed_limit_50",
    "speed_limit_60",
    "speed_limit_70",
    "speed_limit_80",
    "end_of_speed_limit_80",
    "speed_limit_100",
    "speed_limit_120",
    "no_overtaking",
    "no_overtaking_by_trucks",
    "priority_at_next_intersection",
    "priority_road",
    "yield",
    "stop",
    "no_vehicles",
    "no_trucks",
    "no_entry",
    "general_danger",
    "dangerous_curve_left",
    "dangerous_curve_right",
    "double_curve",
    "bumpy_road",
    "slippery_road",
    "road_narrows_on_the_right",
    "road_works",
    "traffic_signals",
    "pedestrians",
    "children_crossing",
    "bicycles_crossing",
    "ice_snow",
    "wild_animals_crossing",
    "end_of_all_limits",
    "turn_right_ahead",
    "turn_left_ahead",
    "ahead_only",
    "go_straight_or_right",
    "go_straight_or_left",
    "keep_right",
    "keep_left",
    "roundabout",
    "end_of_no_overtaking",
    "end_of_no_overtaking_by_trucks",
)
NUM_SIGN_CLASSES = len(GTSRB_CLASS_NAMES)
NOT_A_SIGN = "not_a_sign"
"""Name of the background class: a crop that shows none of the 43 signs."""
UNKNOWN = "unknown"
"""Name reported for a rejected crop (class_id -1)."""
