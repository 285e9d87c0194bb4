"""letterbox, box_iou, nms, decode and DetectorSpec: the contract every detector backend shares."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from services.common.errors import InputError, ModelError
from services.common.modelcard import ModelCard
from services.detector.api import DetectorSettings
from services.detector.postprocess import LETTERBOX, PRE_NMS_TOP_K, DetectorSpec, box_iou, decode, letterbox, nms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def card(**extra) -> ModelCard:
    fields = {
        "stride": 4,
        "box_output": "boxes",
        "letterbox": LETTERBOX,
        "score_threshold": 0.3,
        "nms_iou": 0.5,
        "max_detections": 10,
        **extra,
    }
    return ModelCard(
        name="d",
        version="1",
        task="detector",
        architecture="none",
        class_names=("traffic_sign",),
        input_hw=(16, 24),
        mean=MEAN,
        std=STD,
        onnx_sha256="0" * 64,
        onnx_output="heatmap",
        extra={k: v for k, v in fields.items() if v is not None},
    )


def spec(**overrides) -> DetectorSpec:
    return DetectorSpec.from_card(card(), DetectorSettings(**overrides))


def reference_letterbox(image: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Pillow resize, pad, then normalise in float64: the slow obvious way."""
    big_h, big_w = hw
    h, w = image.shape[:2]
    scale = min(big_h / h, big_w / w)
    new_w, new_h = round(w * scale), round(h * scale)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), np.float64)
    norm = (resized / 255 - np.asarray(MEAN)) / np.asarray(STD)
    out = np.zeros((3, big_h, big_w))
    out[:, :new_h, :new_w] = norm.transpose(2, 0, 1)
    return out, scale


# --- letterbox -------------------------------------------------------------------------------------------------------


# Frames at most 3x the input each way: Pillow's plain bilinear resize, pixel for pixel.
@pytest.mark.parametrize("hw", [(100, 150), (180, 288), (16, 24), (64, 96), (7, 200), (150, 60), (1, 1), (33, 17)])
def test_letterbox_matches_reference(hw):
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    batch, scales = letterbox([image], (64, 96), MEAN, STD)
    expected, scale = reference_letterbox(image, (64, 96))
    assert batch.shape == (1, 3, 64, 96)
    assert batch.dtype == np.float32
    assert scales.tolist() == [scale]
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)


def test_letterbox_pads_with_the_mean_colour_at_bottom_right():
    image = np.full((10, 40, 3), 255, np.uint8)
    batch, scales = letterbox([image], (64, 96), MEAN, STD)
    assert scales[0] == pytest.approx(96 / 40)
    new_h = round(10 * 96 / 40)  # 24 rows of image, then padding
    assert np.all(batch[0, :, new_h:, :] == 0)
    assert np.all(batch[0, :, :new_h, :] > 0)  # white, above the mean


def test_letterbox_batch_of_mixed_sizes_into_a_buffer():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(40, 60), (64, 96), (100, 20)]]
    buffer = np.full((4, 3, 64, 96), np.nan, np.float32)
    batch, scales = letterbox(images, (64, 96), MEAN, STD, out=buffer)
    assert batch.shape == (3, 3, 64, 96)
    assert np.shares_memory(batch, buffer)
    assert not np.isnan(batch).any()
    for i, image in enumerate(images):
        expected, scale = reference_letterbox(image, (64, 96))
        np.testing.assert_allclose(batch[i], expected, atol=1e-5)
        assert scales[i] == scale


def test_letterbox_huge_frame_is_close_to_plain_bilinear():
    # Above 3x, Pillow shrinks by an integer factor first: not identical, but the same picture.
    image = np.zeros((800, 4000, 3), np.uint8)
    image[:, 2000:] = 200
    batch, scales = letterbox([image], (64, 96), MEAN, STD)
    expected, _ = reference_letterbox(image, (64, 96))
    assert scales[0] == pytest.approx(96 / 4000)
    assert np.abs(batch[0] - expected).mean() < 0.05


@pytest.mark.parametrize(
    "image",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3))],
    ids=["gray", "rgba", "float", "empty"],
)
def test_letterbox_bad_image(image):
    with pytest.raises(InputError, match=r"image 0: expected \(h, w, 3\) uint8"):
        letterbox([image], (64, 96), MEAN, STD)


def test_letterbox_bad_buffer():
    with pytest.raises(InputError, match=r"out: expected \(>=2, 3, 64, 96\) float32, got \(1, 3, 64, 96\)"):
        letterbox([np.zeros((4, 4, 3), np.uint8)] * 2, (64, 96), MEAN, STD, out=np.zeros((1, 3, 64, 96), np.float32))


# --- box_iou, nms ----------------------------------------------------------------------------------------------------

coords = st.floats(0, 100, allow_nan=False, width=32)


@st.composite
def box_arrays(draw, max_n: int = 12) -> np.ndarray:
    n = draw(st.integers(0, max_n))
    corners = draw(hnp.arrays(np.float32, (n, 4), elements=coords))
    return np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1)


@settings(max_examples=60, deadline=None)
@given(a=box_arrays(), b=box_arrays())
def test_iou_in_unit_interval_and_symmetric(a, b):
    iou = box_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert iou.dtype == np.float32
    assert np.all((iou >= 0) & (iou <= 1))
    np.testing.assert_allclose(iou, box_iou(b, a).T, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(a=box_arrays())
def test_iou_of_a_box_with_itself_is_one(a):
    diag = np.diag(box_iou(a, a))
    # Area as box_iou computes it, in float32: a box 1e-32 px wide has zero area there (underflow), hence IoU 0.
    has_area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) > 0
    np.testing.assert_allclose(diag[has_area], 1.0, atol=1e-5)
    assert np.all(diag[~has_area] == 0)


def test_iou_known_values():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]])


def test_iou_into_buffer():
    out = np.full((1, 2), np.nan, np.float32)
    result = box_iou(np.array([[0, 0, 2, 2]], np.float32), np.array([[0, 0, 2, 2], [0, 0, 0, 0]], np.float32), out=out)
    assert result is out
    assert out.tolist() == [[1.0, 0.0]]


@settings(max_examples=80, deadline=None)
@given(boxes=box_arrays(max_n=30), data=st.data(), threshold=st.floats(0.05, 0.95))
def test_nms_keeps_no_pair_above_threshold(boxes, data, threshold):
    scores = data.draw(hnp.arrays(np.float32, (len(boxes),), elements=st.floats(0, 1, width=32)))
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == np.int64
    assert len(set(keep.tolist())) == len(keep)
    iou = box_iou(boxes[keep], boxes[keep])
    np.fill_diagonal(iou, 0)
    assert np.all(iou <= threshold)
    assert np.all(np.diff(scores[keep]) <= 0)  # highest first
    # Every dropped box overlaps a kept box with a score at least its own by more than the threshold.
    dropped = np.setdiff1d(np.arange(len(boxes)), keep)
    if len(dropped) and len(keep):
        overlap = box_iou(boxes[dropped], boxes[keep]) > threshold
        better = scores[keep][None, :] >= scores[dropped][:, None]
        assert np.all((overlap & better).any(axis=1))


def test_nms_max_keep_and_known_case():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.5, max_keep=2).tolist() == [1, 3]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


# --- decode ----------------------------------------------------------------------------------------------------------


def outputs(peaks: dict[tuple[int, int], tuple[float, list[float]]], n: int = 1, hw=(4, 6)):
    """heatmap, boxes of batch n with the same peaks in every image: (row, col) -> (score, box in network px)."""
    heatmap = np.zeros((n, 1, *hw), np.float32)
    boxes = np.zeros((n, 4, *hw), np.float32)
    for (row, col), (score, box) in peaks.items():
        heatmap[:, 0, row, col] = score
        boxes[:, :, row, col] = box
    return heatmap, boxes


def test_decode_unletterboxes_clips_and_sorts():
    heatmap, boxes = outputs(
        {
            (0, 0): (0.4, [2, 2, 6, 6]),
            (1, 1): (0.9, [4, 4, 12, 10]),
            (3, 5): (0.6, [20, 12, 30, 20]),  # sticks out of the frame once scaled back
            (2, 2): (0.2, [8, 8, 12, 12]),  # below the threshold
        }
    )
    ((xyxy, score),) = decode(heatmap, boxes, np.array([0.5]), [(30, 50)], spec())
    assert score.dtype == np.float32
    assert xyxy.dtype == np.float32
    np.testing.assert_allclose(score, [0.9, 0.6, 0.4])
    np.testing.assert_allclose(xyxy, [[8, 8, 24, 20], [40, 24, 50, 30], [4, 4, 12, 12]])


def test_decode_applies_nms_max_detections_min_box_and_threshold_override():
    heatmap, boxes = outputs(
        {(0, 0): (0.9, [0, 0, 10, 10]), (0, 1): (0.8, [1, 0, 11, 10]), (2, 2): (0.7, [12, 8, 14, 10])}
    )
    ((_, score),) = decode(heatmap, boxes, np.array([1.0]), [(16, 24)], spec())
    assert score.tolist() == pytest.approx([0.9, 0.7])
    ((_, score),) = decode(heatmap, boxes, np.array([1.0]), [(16, 24)], spec(min_box_px=3))
    assert score.tolist() == pytest.approx([0.9])
    ((_, score),) = decode(heatmap, boxes, np.array([1.0]), [(16, 24)], spec(nms_iou=0.95, max_detections=2))
    assert score.tolist() == pytest.approx([0.9, 0.8])
    ((_, score),) = decode(heatmap, boxes, np.array([1.0]), [(16, 24)], spec(score_threshold=0.75))
    assert score.tolist() == pytest.approx([0.9])


def test_decode_swapped_and_nonfinite_boxes():
    heatmap, boxes = outputs({(0, 0): (0.9, [10, 10, 0, 0]), (1, 1): (0.8, [np.nan, 0, 4, 4])})
    ((xyxy, score),) = decode(heatmap, boxes, np.array([1.0]), [(16, 24)], spec())
    assert xyxy.tolist() == [[0, 0, 10, 10]]
    assert score.tolist() == pytest.approx([0.9])


def test_decode_per_image_scales_and_empty():
    heatmap, boxes = outputs({(1, 1): (0.9, [4, 4, 8, 8])}, n=3)
    heatmap[2] = 0
    results = decode(heatmap, boxes, np.array([1.0, 0.25, 1.0]), [(16, 24), (64, 96), (16, 24)], spec())
    assert [len(s) for _, s in results] == [1, 1, 0]
    np.testing.assert_allclose(results[1][0], [[16, 16, 32, 32]])
    assert results[2][0].shape == (0, 4)


def test_decode_caps_candidates_before_nms():
    hw = (40, 60)
    rng = np.random.default_rng(0)
    heatmap = rng.uniform(0.5, 1, (1, 1, *hw)).astype(np.float32)
    ii, jj = np.mgrid[: hw[0], : hw[1]].astype(np.float32)
    boxes = np.stack([jj * 4, ii * 4, jj * 4 + 2, ii * 4 + 2])[None]  # disjoint: NMS drops none
    s = DetectorSpec.from_card(card(stride=1, max_detections=5000).model_copy(update={"input_hw": hw}))
    ((_, score),) = decode(heatmap, boxes, np.array([1.0]), [(400, 400)], s)
    assert len(score) == PRE_NMS_TOP_K < hw[0] * hw[1]
    assert score.min() >= np.sort(heatmap.ravel())[-PRE_NMS_TOP_K]


@pytest.mark.parametrize(
    ("heatmap_shape", "boxes_shape", "message"),
    [
        ((1, 1, 4, 5), (1, 4, 4, 6), r"'heatmap': expected \(1, 1, 4, 6\) float .*got \(1, 1, 4, 5\)"),
        ((1, 1, 4, 6), (1, 2, 4, 6), r"'boxes': expected \(1, 4, 4, 6\) float .*got \(1, 2, 4, 6\)"),
        ((2, 1, 4, 6), (2, 4, 4, 6), r"'heatmap': expected \(1, 1, 4, 6\) float .*got \(2, 1, 4, 6\)"),
    ],
)
def test_decode_wrong_output_shapes(heatmap_shape, boxes_shape, message):
    with pytest.raises(ModelError, match=message):
        decode(np.zeros(heatmap_shape, np.float32), np.zeros(boxes_shape, np.float32), np.ones(1), [(16, 24)], spec())


# --- DetectorSpec ----------------------------------------------------------------------------------------------------


def test_spec_defaults_from_card_and_overrides():
    s = DetectorSpec.from_card(card())
    assert (s.stride, s.output_hw, s.box_output, s.heatmap_output) == (4, (4, 6), "boxes", "heatmap")
    assert (s.score_threshold, s.nms_iou, s.max_detections, s.min_box_px, s.batch_size) == (0.3, 0.5, 10, 0.0, 8)
    s = spec(score_threshold=0.6, nms_iou=0.7, max_detections=3, batch_size=2)
    assert (s.score_threshold, s.nms_iou, s.max_detections, s.batch_size) == (0.6, 0.7, 3, 2)


@pytest.mark.parametrize(
    ("extra", "expectation"),
    [
        ({}, nullcontext()),
        ({"stride": None}, pytest.raises(ModelError, match=r"expected extra\['stride'\] int >= 1, got None")),
        ({"stride": 5}, pytest.raises(ModelError, match=r"expected input_hw positive multiples of stride 5")),
        ({"stride": True}, pytest.raises(ModelError, match=r"extra\['stride'\]")),
        ({"box_output": None}, pytest.raises(ModelError, match=r"extra\['box_output'\] str")),
        ({"box_output": "heatmap"}, pytest.raises(ModelError, match="a box output name other than 'heatmap'")),
        ({"letterbox": "center"}, pytest.raises(ModelError, match=r"extra\['letterbox'\] str 'top-left, pad mean'")),
        ({"score_threshold": 1.5}, pytest.raises(ModelError, match=r"score_threshold'\] float in \[0, 1\], got 1.5")),
        ({"nms_iou": None}, pytest.raises(ModelError, match=r"extra\['nms_iou'\]")),
        ({"max_detections": 0}, pytest.raises(ModelError, match=r"extra\['max_detections'\] int >= 1, got 0")),
        ({"score_threshold": 1}, nullcontext()),  # an int is a fine float
    ],
)
def test_spec_checks_card_extra(extra, expectation):
    with expectation:
        DetectorSpec.from_card(card(**extra))


def test_spec_settings_fill_missing_card_defaults():
    s = DetectorSpec.from_card(card(score_threshold=None), DetectorSettings(score_threshold=0.4))
    assert s.score_threshold == 0.4


def test_spec_rejects_classifier_card():
    with pytest.raises(ModelError, match="expected task 'detector', got 'classifier'"):
        DetectorSpec.from_card(card().model_copy(update={"task": "classifier"}))


def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        DetectorSettings(score_treshold=0.3)  # type: ignore[call-arg]
