"""Loading user images safely: clear errors for missing, corrupt, empty and oversized files; every mode to RGB."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import BadInputError

# A decompression-bomb guard: 64 megapixels is ~8K x 8K, far beyond what any VLM tiles usefully.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    value = os.environ.get("EDGEVLM_MAX_IMAGE_PIXELS")
    return int(value) if value else DEFAULT_MAX_IMAGE_PIXELS


def _check_size(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise BadInputError(f"image {name} is empty ({width}x{height} pixels); pass an image with content")
    limit = max_image_pixels()
    if width * height > limit:
        raise BadInputError(
            f"image {name} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
            "downscale it or raise EDGEVLM_MAX_IMAGE_PIXELS"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way the HF processors do it: transparency composited onto white; 16-bit/32-bit greys scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = np.asarray(image, dtype=np.float64)
        # 16-bit greys (and 32-bit ints holding 16-bit data) are scaled, not clipped: PIL's convert("L") clips at 255.
        top = 65535.0 if image.mode.startswith("I") and grey.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            top = max(float(grey.max(initial=0)), 1.0) if grey.max(initial=0) > 1.0 else 1.0
        grey8 = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """Open a path, take encoded image bytes (e.g. a data URL's payload) or a PIL image, verify it, and return it
    decoded as RGB."""
    if isinstance(source, Image.Image):
        _check_size(source, "(in memory)")
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(source), "(image bytes)")
    path = Path(source)
    try:
        found = path.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
        raise BadInputError(f"image path {str(path)[:80]!r} cannot be opened ({type(exc).__name__}); check the path") from None
    if not found:
        raise BadInputError(f"image not found: {str(path)[:200]}; check the path")
    return _decode(path, str(path))


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phone photos are stored sideways), as transformers' load_image and mlx-vlm do."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is not worth refusing the pixels for
        return image


def _decode(file, name: str) -> Image.Image:
    # The header gives the size before decoding, so a bomb is refused without allocating it.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(file) as image:
            _check_size(image, name)
            image.load()
            return to_rgb(_upright(image))
    except BadInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(f"cannot read image {name}: not a valid or complete image file ({exc})") from None
