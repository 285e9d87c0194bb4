"""load_image() and iter_image_files()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from services.common.errors import InputError, UnreadableImage
from services.common.images import IMAGE_SUFFIXES, iter_image_files, load_image


def rgb_pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """A 10,000 x 10,000 bilevel PNG: about 12 kB on disk, 100 million pixels once decoded."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (10_000, 10_000), 1).save(path)
    return path


@pytest.mark.parametrize("suffix", [".png", ".ppm", ".PNG"])
def test_lossless_round_trip(tmp_path, suffix):
    rgb = rgb_pattern(17, 300)
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, format="PNG" if suffix.lower() == ".png" else "PPM")
    out = load_image(path)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_jpeg(tmp_path):
    rgb = np.full((40, 30, 3), (200, 30, 60), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    out = load_image(tmp_path / "x.jpg")
    assert out.shape == (40, 30, 3)
    assert np.abs(out.astype(int) - rgb).max() < 8


def test_format_is_sniffed_not_taken_from_the_name(tmp_path):
    rgb = rgb_pattern(5, 6)
    Image.fromarray(rgb).save(tmp_path / "really_a_png.jpg", format="PNG")
    np.testing.assert_array_equal(load_image(tmp_path / "really_a_png.jpg"), rgb)


def test_one_pixel(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").tolist() == [[[1, 2, 3]]]


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_gray_bilevel_palette(tmp_path, mode):
    img = Image.fromarray(rgb_pattern(8, 9)).convert(mode)
    img.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))
    if mode != "P":
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
        np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_rgba_is_composited_onto_black(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0] = [(200, 100, 50, 255), (200, 100, 50, 0), (200, 100, 50, 128)]
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    assert out[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]


def test_palette_transparency_is_black(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png")[0].tolist() == [[0, 0, 0], [0, 255, 0]]


def test_16_bit_gray_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65278, 65535, 1000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode.startswith("I")  # the file really is 16-bit
    out = load_image(tmp_path / "x.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 254, 255, 4]
    assert out[0, :, 2].tolist() == out[0, :, 0].tolist()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "x.jpg")
    out = load_image(tmp_path / "x.jpg")
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] > 200
    assert out[0, 0, 1] < 50


def test_missing(tmp_path):
    with pytest.raises(UnreadableImage, match=r"nope\.png: expected a PNG/JPEG/PPM image, found no such file"):
        load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(UnreadableImage, match="expected a PNG/JPEG/PPM image, got a directory"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(UnreadableImage, match=r"x\.png: expected a PNG/JPEG/PPM image, got 0 bytes$"):
        load_image(tmp_path / "x.png")


def test_text_named_png(tmp_path):
    (tmp_path / "x.png").write_text("hello, I am not a picture\n")
    with pytest.raises(UnreadableImage, match=r"expected a PNG/JPEG/PPM image, got 26 bytes of something else"):
        load_image(tmp_path / "x.png")


def test_other_image_format_is_refused(tmp_path):
    Image.new("RGB", (3, 3)).save(tmp_path / "x.png", format="BMP")
    with pytest.raises(
        UnreadableImage, match=r"expected a PNG/JPEG/PPM image, got \d+ bytes of something else \(starting b'BM"
    ):
        load_image(tmp_path / "x.png")


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".ppm", "PPM")])
def test_truncated(tmp_path, suffix, fmt):
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb_pattern(120, 90)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage, match=f"expected a complete {fmt} image, got a truncated or corrupt one"):
        load_image(path)


def test_corrupt_png_header(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_pattern(4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = b"\xff" * 8  # width and height inside IHDR; its CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableImage, match=r"x\.png: expected a (PNG/JPEG/PPM|complete PNG) image, got a"):
        load_image(path)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.floats(0, 1, exclude_max=True))
def test_a_truncated_png_never_gives_wrong_pixels(tmp_path, keep):
    """Cut anywhere: an error, or (cut only in the trailing checksums and end marker) exactly the pixels."""
    rgb = rgb_pattern(20, 20)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    try:
        out = load_image(path)
    except UnreadableImage as exc:
        message = str(exc)
    else:
        np.testing.assert_array_equal(out, rgb)
        return
    assert message.startswith(f"{path}: expected")


def test_huge_image_refused_before_decoding(huge_png, monkeypatch):
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # refused from the header alone
    with pytest.raises(UnreadableImage, match=r"expected at most 99,999,999 pixels, got 10000x10000 = 100,000,000"):
        load_image(huge_png, max_pixels=99_999_999)


def test_huge_image_within_the_limit_loads(huge_png):
    # 100 million pixels is the default limit; Pillow's own (89 million, a warning, an error under pytest) does
    # not apply.
    out = load_image(huge_png)
    assert out.shape == (10_000, 10_000, 3)
    assert out[0, 0].tolist() == [255, 255, 255]


def test_header_claiming_a_huge_size_is_refused(tmp_path):
    # A 1x1 PNG whose header says 60000 x 60000: refused without trying to allocate 10 GB.
    Image.new("L", (1, 1)).save(tmp_path / "x.png")
    data = bytearray((tmp_path / "x.png").read_bytes())
    data[16:24] = (60_000).to_bytes(4, "big") * 2
    (tmp_path / "x.png").write_bytes(bytes(data))
    with pytest.raises(UnreadableImage):
        load_image(tmp_path / "x.png")


# iter_image_files ------------------------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_iter_files_and_folders(tmp_path):
    a = touch(tmp_path / "d" / "b" / "2.PNG")
    b = touch(tmp_path / "d" / "b" / "10.jpeg")
    c = touch(tmp_path / "d" / "a.ppm")
    touch(tmp_path / "d" / "notes.txt")
    touch(tmp_path / "d" / "GT.csv")
    (tmp_path / "d" / "folder.png").mkdir()
    given_file = touch(tmp_path / "loose.txt")
    out = list(iter_image_files([given_file, tmp_path / "d"]))
    assert out == [given_file, c, b, a]


def test_iter_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nope: expected a file or folder, found no such path"):
        list(iter_image_files([tmp_path / "nope"]))


def test_iter_empty_folder(tmp_path):
    touch(tmp_path / "d" / "readme.txt")
    with pytest.raises(InputError, match=r"^no \.ppm/\.png/\.jpg/\.jpeg images under .*d$"):
        list(iter_image_files([tmp_path / "d"]))


def test_image_suffixes():
    assert IMAGE_SUFFIXES == (".ppm", ".png", ".jpg", ".jpeg")
