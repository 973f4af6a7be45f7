"""Decode any image file into the RGB array a backbone sees, or say why it cannot be used.

The same function serves extraction and prediction, so preprocessing is identical in both.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featcache.files import open_regular

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
MAX_PIXELS = 100_000_000  # larger is a decompression bomb or a mistake, never a photo to classify
MIN_SIDE = 8  # a 1x1 or 4x4 "image" carries no content worth a feature vector
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
RESIZE_MODES = ("squash", "crop")


class RejectedImage(Exception):
    """The file cannot become a training row; the message is the reason shown to the user."""


UNREADABLE = "could not be read"  # a reject that says nothing of the content: the next extract retries it


def load_image(path: str | Path, size: int, resize: str = "squash", sha256: str | None = None) -> np.ndarray:
    """Return a (size, size, 3) uint8 RGB array, or raise RejectedImage with the reason.

    "squash" resizes without keeping the aspect ratio (like Keras); "crop" takes the largest
    centred square first. With ``sha256`` (the hash a scan took) the very bytes decoded are hashed:
    a file rewritten since the scan is refused for this run, never given the scanned file's row.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise RejectedImage("empty file")
        source = path
        if sha256 is not None:
            with open_regular(path) as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RejectedImage(f"{UNREADABLE} as scanned (its content changed during extract); "
                                    "the next extract reads it again")
            source = io.BytesIO(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                _check_dimensions(img.size)
                img.draft("RGB", (size, size))  # JPEG: decode at the smallest sufficient scale
                img.load()
                rgb = _to_rgb(ImageOps.exif_transpose(img))
    except RejectedImage:
        raise
    except UnidentifiedImageError:
        raise RejectedImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"too large ({exc})") from None
    except (FileNotFoundError, PermissionError) as exc:  # gone or locked now: not the file's content
        raise RejectedImage(f"{UNREADABLE} ({exc.strerror}); the next extract tries it again") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RejectedImage(f"corrupt or truncated ({exc})") from None
    except Exception as exc:  # Pillow's plugins raise odd types on malformed files: never crash a run
        raise RejectedImage(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if resize == "crop":
        rgb = ImageOps.fit(rgb, (size, size), Image.Resampling.BILINEAR)
    else:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _check_dimensions(wh: tuple[int, int]) -> None:
    width, height = wh
    if width * height > MAX_PIXELS:
        raise RejectedImage(f"too large ({width}x{height} px; limit {MAX_PIXELS // 10**6} MP)")
    if min(width, height) < MIN_SIDE:
        raise RejectedImage(f"too small ({width}x{height} px; minimum {MIN_SIDE} px per side)")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Greyscale, palette, CMYK, 16-bit and alpha images all become plain 8-bit RGB."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
