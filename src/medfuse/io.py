"""Image and file I/O shared by every step: atomic writes, hashing, validated 8-bit image reads.

Every output is written to a temporary name in the destination folder and renamed into place,
so an interrupted step never leaves a partial file that looks complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfuse.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# atomic_path's temporary names: ".<name>.<8 random characters of mkstemp>.part", hidden.
_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".part"
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.part$")
_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{_TEMP_PREFIX}{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete atomic_path's temporary files under `folder`, left by a process killed outright
    (its `finally` never ran); return how many. Files of any other name are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    candidates = folder.rglob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}")
    stale = [p for p in candidates if TEMP_NAME.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("%s: removed %d leftover temporary file(s) (.*.part)", folder, len(stale))
    return len(stale)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# The formats `write_image` writes, by suffix: the bytes always match the name.
IMAGE_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG"}
LOSSY_FORMATS = frozenset({"JPEG"})
# JPEG at its best: quality 95 and no chroma subsampling (a recoloured PET keeps sharp colour).
_SAVE_OPTIONS: dict[str, dict[str, int]] = {"JPEG": {"quality": 95, "subsampling": 0}}


def image_format(path: str | Path) -> str:
    """The PIL format `path`'s suffix names (PNG, TIFF or JPEG); any other is a ConfigError."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        problem = (
            f"{suffix!r} is not an image format medfuse writes"
            if suffix
            else "no suffix names the image format"
        )
        raise ConfigError(f"{path}: {problem}; end the name with one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 grey (H, W) or RGB (H, W, 3) array atomically, in the format its suffix
    names (`IMAGE_FORMATS`); the temporary name's own suffix is .part, so it is passed."""
    if array.dtype != np.uint8:
        raise TypeError(f"{path}: expected a uint8 array, got {array.dtype}")
    image_type = image_format(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=image_type, **_SAVE_OPTIONS.get(image_type, {}))


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8 with rounding (not truncation)."""
    return np.clip(np.rint(np.asarray(image01, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """Decode an 8-bit grey or RGB image fully and return it as uint8 (H, W) or (H, W, 3).

    `mode` ("L" or "RGB") is the expected mode; an image in another mode is a DataError,
    except that an RGB image whose three channels are equal is accepted as grey.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            img.load()  # force a full decode: a truncated file fails here, not later
            pil_mode = img.mode
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    if pil_mode not in ("L", "RGB", "RGBA", "P"):
        raise DataError(f"{path}: unsupported image mode {pil_mode!r} (expected 8-bit grey or RGB)")
    if pil_mode == "P":
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    if pil_mode == "RGBA":
        array = array[..., :3]
    if array.dtype != np.uint8:
        raise DataError(f"{path}: expected 8-bit pixels, got {array.dtype}")
    if mode == "L" and array.ndim == 3:
        if not (
            np.array_equal(array[..., 0], array[..., 1])
            and np.array_equal(array[..., 0], array[..., 2])
        ):
            raise DataError(f"{path}: expected a grey image, got colour ({pil_mode})")
        array = array[..., 0]
    if mode == "RGB" and array.ndim != 3:
        raise DataError(f"{path}: expected an RGB image, got grey ({pil_mode})")
    return np.ascontiguousarray(array)
