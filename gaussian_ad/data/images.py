"""Image sources, manifests and decoding with clear errors.

A manifest is a sorted list of :class:`ImageRecord` rows. :func:`mvtec_manifest` reads the
MVTec AD folder layout, :func:`folder_manifest` collects unlabelled images from files and
folders. :func:`load_rgb` turns any supported source into a fully decoded RGB image, or raises
:class:`ImageDecodeError` with a reason a person can act on.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".gif", ".heic", ".heif", ".avif", ".jp2", ".ico", ".svg"}
)
"""Image formats that are listed as errors (with the reason), never skipped silently."""
SPLITS: tuple[str, ...] = ("train", "test")
GOOD = "good"

# Exceptions Pillow's decoders raise for damaged data (besides UnidentifiedImageError).
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)

ImageSource = (
    str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray
)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a manifest; ``label`` is 0 normal, 1 anomalous, -1 unknown."""

    path: str
    category: str = ""
    split: str = ""
    label: int = -1
    defect: str = ""
    mask: str | None = None


class ImageDecodeError(Exception):
    """An image that cannot be read or decoded; ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep path and reason when pickled across processes
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class ImageError:
    """A per-file error record (for reports of images that were skipped)."""

    path: str
    reason: str


def _is_image_file(path: Path) -> bool:
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; hidden files are skipped."""
    return sorted(p for p in folder.iterdir() if _is_image_file(p))


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Sorted names of the subfolders of ``root`` that contain ``train/good``."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"MVTec root folder not found: {root_path}")
    return sorted(
        p.name
        for p in root_path.iterdir()
        if not p.name.startswith(".") and (p / "train" / GOOD).is_dir()
    )


def mvtec_manifest(
    root: str | os.PathLike, category: str, splits: Iterable[str] = SPLITS
) -> list[ImageRecord]:
    """Records of one category in the MVTec AD layout.

    ``<root>/<category>/train/good/*``, ``test/good/*`` (label 0, defect "good") and
    ``test/<defect>/*`` (label 1) with masks at ``ground_truth/<defect>/<stem>_mask.png``
    (``mask`` is None when that file does not exist). Order: train, then test with "good"
    first and the other defect folders by name; files by name within a folder.
    """
    splits = tuple(splits)
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected a subset of {list(SPLITS)}")
    category_dir = Path(root) / category
    if not category_dir.is_dir():
        raise FileNotFoundError(f"MVTec category folder not found: {category_dir}")
    train_good = category_dir / "train" / GOOD
    if not train_good.is_dir():
        raise FileNotFoundError(f"MVTec category has no train/good folder: {train_good}")

    records: list[ImageRecord] = []
    if "train" in splits:
        records += [
            ImageRecord(str(p), category, "train", 0, GOOD) for p in _image_files(train_good)
        ]
    if "test" in splits:
        test_dir = category_dir / "test"
        if not test_dir.is_dir():
            raise FileNotFoundError(f"MVTec category has no test folder: {test_dir}")
        defect_dirs = sorted(
            (p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: (p.name != GOOD, p.name),
        )
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            for image in _image_files(defect_dir):
                if defect == GOOD:
                    records.append(ImageRecord(str(image), category, "test", 0, GOOD))
                    continue
                mask = category_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
                mask_path = str(mask) if mask.is_file() else None
                records.append(ImageRecord(str(image), category, "test", 1, defect, mask_path))
    return records


def folder_manifest(paths: Iterable[str | os.PathLike]) -> list[ImageRecord]:
    """Unlabelled records of the images :func:`scan_images` finds; what it rejects is logged."""
    records, rejected = scan_images(paths)
    for error in rejected:
        logger.warning("skipped %s: %s", error.path, error.reason)
    return records


def scan_images(paths: Iterable[str | os.PathLike]) -> tuple[list[ImageRecord], list[ImageError]]:
    """Records of the image files among ``paths`` (folders searched recursively), and an
    error record for every entry that looks like an image but cannot be one.

    Images: regular files with an extension in :data:`IMAGE_EXTENSIONS`. Rejected, with the
    reason: such names that are FIFOs, sockets or devices, broken links or link loops, or
    folders; files in :data:`UNSUPPORTED_IMAGE_EXTENSIONS`; and any file named directly that
    is not a supported image. Other files in folders, and hidden files and folders, are
    skipped. Sorted by path, free of duplicates. A named path that does not exist raises
    FileNotFoundError.
    """
    found: set[str] = set()
    rejected: dict[str, str] = {}

    def consider(path: Path, named: bool) -> None:
        suffix = path.suffix.lower()
        if suffix in UNSUPPORTED_IMAGE_EXTENSIONS or (named and suffix not in IMAGE_EXTENSIONS):
            rejected[str(path)] = f"unsupported image format {suffix or '(no extension)'}; " + (
                "supported: " + ", ".join(sorted(IMAGE_EXTENSIONS))
            )
        elif suffix in IMAGE_EXTENSIONS:
            problem = entry_problem(path)
            if problem is None:
                found.add(str(path))
            else:
                rejected[str(path)] = problem

    for given in paths:
        path = Path(given)
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(f"image file or folder not found: {path}")
        if path.is_dir():
            for folder, subfolders, files in os.walk(path):
                subfolders[:] = [d for d in subfolders if not d.startswith(".")]
                for name in subfolders:
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                        rejected[str(Path(folder) / name)] = "a folder named like an image"
                for name in files:
                    if not name.startswith("."):
                        consider(Path(folder) / name, named=False)
        else:
            consider(path, named=True)
    records = [ImageRecord(p) for p in sorted(found)]
    return records, [ImageError(p, reason) for p, reason in sorted(rejected.items())]


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an image file without blocking, or None if it can."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if os.path.islink(path):
            return "broken symbolic link"
        if exc.errno == errno.ENOENT:
            return "file not found"
        return f"cannot read file: {exc.strerror or exc}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device"}
        return f"not a regular file ({kinds.get(stat.S_IFMT(mode), 'a device')})"
    return None


def load_rgb(
    source: ImageSource, draft_size: int | None = None, name: str | None = None
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image.

    ``source`` is a path, encoded bytes, a binary file object, a PIL image or a numpy array
    (HxW, HxWx3 or HxWx4; uint8, uint16, bool, or float in [0, 1]). ``name`` labels non-path
    sources in error messages.

    Conversions: images with transparency are composited on black (a fully transparent pixel
    becomes black, whatever colour it stored). 16-bit grayscale is scaled from its full range
    (value / 257, so 65535 -> 255). Mode "I" (32-bit int) is taken as 8-bit when its values lie
    in [0, 255], as 16-bit when they lie in [0, 65535], and min-max scaled otherwise; mode "F"
    is taken as [0, 1] or [0, 255] data when it fits, and min-max scaled otherwise. Multi-frame
    files give their first frame; EXIF orientation is not applied.

    With ``draft_size``, JPEG files decode at a reduced scale (Pillow draft mode) that keeps
    both sides >= ``draft_size``; other formats decode at full size.

    Raises ImageDecodeError for missing, empty, unreadable, non-image, truncated or corrupt
    files, for images over Pillow's ``Image.MAX_IMAGE_PIXELS`` (decompression bombs), and for
    unsupported arrays.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        try:
            source.load()
        except _DECODER_ERRORS as exc:
            raise ImageDecodeError(label, f"truncated or corrupt image: {exc}") from exc
        return _to_rgb(source, label)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name or "<array>")
    if isinstance(source, str | os.PathLike):
        label = name or os.fspath(source)
        problem = entry_problem(source)  # a FIFO would block open() forever
        if problem is not None:
            raise ImageDecodeError(label, problem)
        try:
            with open(source, "rb") as file:
                return _decode(file, label, draft_size)
        except FileNotFoundError as exc:
            raise ImageDecodeError(label, "file not found") from exc
        except IsADirectoryError as exc:
            raise ImageDecodeError(label, "is a directory, not a file") from exc
        except PermissionError as exc:
            raise ImageDecodeError(label, "permission denied") from exc
        except OSError as exc:
            raise ImageDecodeError(label, f"cannot read file: {exc.strerror or exc}") from exc
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(io.BytesIO(source), name or "<bytes>", draft_size)
    if hasattr(source, "read"):
        label = name or str(getattr(source, "name", "<stream>"))
        return _decode(io.BytesIO(source.read()), label, draft_size)
    raise TypeError(f"unsupported image source type: {type(source).__name__}")


def _decode(file: BinaryIO, label: str, draft_size: int | None) -> Image.Image:
    """Open, decode and convert an encoded image from a seekable binary file."""
    if file.seek(0, io.SEEK_END) == 0:
        raise ImageDecodeError(label, "empty file")
    file.seek(0)
    try:
        with Image.open(file) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            _check_pixel_count(img, label)
            img.load()
            if img.mode == "RGB" and not img.has_transparency_data:
                return img  # already what _to_rgb would copy it into
            return _to_rgb(img, label)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(label, "not an image (cannot identify image file)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(label, f"image too large (decompression bomb guard): {exc}") from exc
    except _DECODER_ERRORS as exc:
        raise ImageDecodeError(label, f"truncated or corrupt image: {exc}") from exc


def _check_pixel_count(img: Image.Image, label: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            label,
            f"image too large (decompression bomb guard): {width}x{height} pixels exceeds "
            f"the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)",
        )


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert a loaded PIL image of any mode to a new RGB image."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), label)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "La":
        img = img.convert("LA")
    if img.has_transparency_data:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        composited = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
        return Image.fromarray(composited.astype(np.uint8), "RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(label, f"unsupported image mode {mode!r}: {exc}") from exc


def _scale_to_uint8(values: np.ndarray, label: str) -> np.ndarray:
    """Scale an array to uint8: 16-bit by 1/257, other types as described in load_rgb."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if values.dtype.kind in "iuf":
        data = values.astype(np.float64)
        if not np.isfinite(data).all():
            raise ImageDecodeError(label, "image values contain NaN or infinity")
        low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
        if values.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
            scaled = data * 255.0
        elif low >= 0.0 and high <= 255.0:
            scaled = data
        elif values.dtype.kind in "iu" and low >= 0.0 and high <= 65535.0:
            scaled = data / 257.0
        elif high > low:
            scaled = (data - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(data)
        return np.rint(scaled).astype(np.uint8)
    raise ImageDecodeError(label, f"unsupported pixel type {values.dtype}")


def _array_to_rgb(array: np.ndarray, label: str) -> Image.Image:
    """Build an RGB image from an HxW, HxWx1, HxWx3 or HxWx4 array (alpha on black)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageDecodeError(
            label, f"unsupported array shape {array.shape}; expected HxW, HxWx3 or HxWx4"
        )
    if array.dtype.kind == "f":
        data = array.astype(np.float64)
        if not np.isfinite(data).all() or data.min(initial=0.0) < 0 or data.max(initial=0.0) > 1:
            raise ImageDecodeError(label, "float array values must lie in [0, 1]")
        array = np.rint(data * 255.0).astype(np.uint8)
    elif array.dtype.kind not in "ub" or array.dtype.itemsize > 2:
        raise ImageDecodeError(
            label, f"unsupported array dtype {array.dtype}; expected uint8, uint16, bool or float"
        )
    pixels = _scale_to_uint8(np.ascontiguousarray(array), label)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    elif pixels.shape[2] == 4:
        alpha = pixels[..., 3:].astype(np.uint16)
        pixels = ((pixels[..., :3] * alpha + 127) // 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_fingerprint(records: Iterable[ImageRecord]) -> str:
    """A SHA-256 fingerprint of a manifest that survives moving the dataset folder.

    Covers, for every record: its path relative to the records' common folder, category,
    split, label, defect, whether it has a mask, and the file size in bytes (-1 when the path
    is not a local file). It does not read file contents (use :func:`file_digest` for that) and
    ignores modification times, so it is cheap for millions of files and the same on any
    machine that holds the same files. The record order does not matter.
    """
    rows = list(records)
    if not rows:
        return hashlib.sha256(b"[]").hexdigest()
    absolute = [os.path.abspath(r.path) for r in rows]
    base = os.path.commonpath([os.path.dirname(p) for p in absolute])
    lines = sorted(
        json.dumps(
            [
                Path(os.path.relpath(path, base)).as_posix(),
                r.category,
                r.split,
                r.label,
                r.defect,
                r.mask is not None,
                os.path.getsize(path) if os.path.isfile(path) else -1,
            ]
        )
        for r, path in zip(rows, absolute, strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_masks(mask_paths: Sequence[str | None], size: int | tuple[int, int]) -> np.ndarray:
    """(n, H, W) bool ground truth, resized with nearest neighbour to ``size`` (H = W, or
    (H, W)); None = all normal."""
    height, width = (size, size) if isinstance(size, int) else size
    masks = np.zeros((len(mask_paths), height, width), dtype=bool)
    for i, path in enumerate(mask_paths):
        if path is not None:
            with Image.open(path) as mask:
                resized = mask.convert("L").resize((width, height), Image.Resampling.NEAREST)
            masks[i] = np.asarray(resized) > 127
    return masks
