"""Reading still images (sign crops, dataset files) into (H, W, 3) uint8 RGB arrays.

Only PNG, JPEG and the PPM family (PBM/PGM/PPM, as GTSRB ships them) are accepted; the format is sniffed from
the file's first bytes, not from its name. Every failure is an ``UnreadableImage`` whose message says what was
expected and what was found, with the path first, so that a CLI can print it as it is.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, PpmImagePlugin

from services.common.errors import InputError, UnreadableImage

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "iter_image_files", "load_image"]

IMAGE_SUFFIXES: Final = (".ppm", ".png", ".jpg", ".jpeg")
"""File name suffixes (compared case-insensitively) that ``iter_image_files`` picks up inside folders."""

DEFAULT_MAX_PIXELS: Final = 100_000_000
"""Largest width x height ``load_image`` decodes by default (a 10,000 x 10,000 image; 300 MB as RGB)."""

_EXPECTED = "a PNG/JPEG/PPM image"
_SUFFIX_LIST = "/".join(IMAGE_SUFFIXES)

_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What Pillow raises on damaged data: it reports bad headers as SyntaxError and short data as OSError.
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def load_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG, JPEG or PPM file fully into memory as RGB.

    The image is decoded completely, so a truncated file is an error rather than a picture with a grey bottom
    (Pillow's global ``LOAD_TRUNCATED_IMAGES`` is left alone); only a file cut after its last pixel, in the
    trailing checksums or end marker, still loads, with every pixel intact. Its size is checked against
    ``max_pixels`` from the header, before any pixel is decoded; this check replaces Pillow's global
    ``MAX_IMAGE_PIXELS``, which does not apply here. Conversions:

    * grayscale, bilevel, palette and CMYK images are converted to RGB by Pillow;
    * 16-bit grayscale is scaled to 8 bits with rounding (65535 -> 255), not clipped;
    * an alpha channel (or a palette/colour-key transparency) is composited onto black, so fully transparent
      pixels are black whatever colour the file stores under them.

    Args:
        path: The image file.
        max_pixels: Largest width x height accepted.

    Returns:
        (H, W, 3) uint8 RGB array, C-contiguous.

    Raises:
        UnreadableImage: The file is missing, a folder, empty, not a PNG/JPEG/PPM image, truncated or corrupt,
            larger than ``max_pixels``, or in a pixel mode that cannot be converted to RGB.
    """
    if not path.exists():
        raise UnreadableImage(f"{path}: expected {_EXPECTED}, found no such file")
    if path.is_dir():
        raise UnreadableImage(f"{path}: expected {_EXPECTED}, got a directory")
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
            if not head:
                raise UnreadableImage(f"{path}: expected {_EXPECTED}, got 0 bytes")
            return _decode(path, fh, head, max_pixels)
    except OSError as exc:
        # Only opening and reading the file itself get here: _decode translates Pillow's own OSErrors.
        raise UnreadableImage(f"{path}: expected a readable file, got {exc.strerror or exc}") from exc


def _decode(path: Path, fh: BinaryIO, head: bytes, max_pixels: int) -> np.ndarray:
    sniffed = _sniff(head)
    if sniffed is None:
        size = path.stat().st_size
        raise UnreadableImage(f"{path}: expected {_EXPECTED}, got {size} bytes of something else (starting {head!r})")
    plugin, fmt = sniffed
    try:
        fh.seek(0)
        # The plugin class is used directly, rather than Image.open, so that Pillow's process-wide
        # decompression-bomb limit (and its warning) does not apply; max_pixels below is the one limit.
        img = plugin(fh, os.fspath(path))
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: expected {_EXPECTED}, got a corrupt {fmt} header ({exc})") from exc
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise UnreadableImage(
                f"{path}: expected at most {max_pixels:,} pixels, got {width}x{height} = {width * height:,}"
            )
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            raise UnreadableImage(
                f"{path}: expected a complete {fmt} image, got a truncated or corrupt one ({exc})"
            ) from exc
        try:
            return _to_rgb(img)
        except ValueError as exc:  # Pillow has no conversion from this mode to RGB
            raise UnreadableImage(f"{path}: expected an RGB-convertible {fmt} image, got mode {img.mode}") from exc


def _sniff(head: bytes) -> tuple[type[ImageFile.ImageFile], str] | None:
    """Pillow plugin class and format name for a file's first bytes; None if not PNG, JPEG or PPM/PGM/PBM."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PngImagePlugin.PngImageFile, "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile, "JPEG"
    if head[:1] == b"P" and head[1:2] in {b"1", b"2", b"3", b"4", b"5", b"6"}:  # not PFM ("Pf") nor PAM ("P7")
        return PpmImagePlugin.PpmImageFile, "PPM"
    return None


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Decoded Pillow image of any mode -> (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.ascontiguousarray(img)
    if mode in _SIXTEEN_BIT_MODES:
        # Clipped only for mode "I" (int32), which some decoders use for 16-bit samples; 0..65535 -> 0..255.
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        return _gray_to_rgb(((wide + 128) // 257).astype(np.uint8))
    if mode in {"L", "1"} and "transparency" not in img.info:
        return _gray_to_rgb(np.asarray(img.convert("L") if mode == "1" else img))
    if "A" in mode or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[..., 3:].astype(np.uint16)
        return ((rgba[..., :3] * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(img.convert("RGB"))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8, the same value in every channel."""
    rgb = np.empty((*gray.shape, 3), np.uint8)
    rgb[...] = gray[..., None]
    return rgb


def iter_image_files(paths: Sequence[Path]) -> Iterator[Path]:
    """Image files named by ``paths``, in order.

    A file is yielded as given, whatever its suffix (reading it is ``load_image``'s job). A folder is walked
    recursively and yields the files with a suffix in ``IMAGE_SUFFIXES`` (any case), sorted by path. Symbolic
    links to folders are not followed.

    Args:
        paths: Files and folders.

    Yields:
        Paths of image files; those found in a folder start with the folder as given.

    Raises:
        InputError: A path does not exist, or a folder holds no image file. It is raised when the iteration
            reaches that path; the files of earlier paths have been yielded by then.
    """
    for path in paths:
        if path.is_dir():
            found = sorted(_walk_images(path))
            if not found:
                raise InputError(f"no {_SUFFIX_LIST} images under {path}")
            yield from found
        elif path.exists():
            yield path
        else:
            raise InputError(f"{path}: expected a file or folder, found no such path")


def _walk_images(folder: Path) -> Iterator[Path]:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(root, name)
