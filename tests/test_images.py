"""Every image mode becomes the RGB the HF processors make; bad files fail with one clear line."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from edgevlm.errors import BadInputError
from edgevlm.images import load_image


def _rgba() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), mode="RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "RGB", "1"])
def test_modes_match_hf_conversion(mode, tmp_path):
    image = _rgba().convert(mode)
    path = tmp_path / f"x.{'tiff' if mode == 'CMYK' else 'png'}"
    image.save(path)
    with Image.open(path) as reopened:
        expected = convert_to_rgb(reopened, return_numpy=True)
    ours = np.asarray(load_image(path))
    assert ours.shape == expected.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)  # uint16 -> mode I;16
    rgb = np.asarray(load_image(path))
    assert rgb[..., 0].flatten().tolist() == [int(round(v * 255 / 65535)) for v in grey.flatten().tolist()]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_missing_file():
    with pytest.raises(BadInputError, match="image not found"):
        load_image("/nonexistent/cat.jpg")


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"not an image at all" * 10)
    with pytest.raises(BadInputError, match="not a valid or complete image"):
        load_image(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(BadInputError, match="cut.png"):
        load_image(path)


def test_zero_size_image():
    with pytest.raises(BadInputError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


def test_huge_image_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(path)  # 72 MP, over the default 64 MP limit
    with pytest.raises(BadInputError, match="over the limit of 64,000,000"):
        load_image(path)
    monkeypatch.setenv("EDGEVLM_MAX_IMAGE_PIXELS", "100")
    small = tmp_path / "s.png"
    Image.new("RGB", (20, 20)).save(small)
    with pytest.raises(BadInputError, match="EDGEVLM_MAX_IMAGE_PIXELS"):
        load_image(small)


def test_encoded_bytes_load_like_the_file(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "pic.png"
    Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA").save(path)
    data = path.read_bytes()
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(load_image(path)))
    with pytest.raises(BadInputError, match=r"image bytes.*not a valid or complete image"):
        load_image(data[: len(data) // 2])


def test_an_impossible_path_is_a_clear_error():
    """Found by the request-body fuzzer: a 300-character 'path' raised OSError (file name too long)."""
    from edgevlm.errors import BadInputError
    from edgevlm.images import load_image

    with pytest.raises(BadInputError, match="cannot be opened"):
        load_image("a" * 300)
    with pytest.raises(BadInputError, match="image not found"):
        load_image("x\x00y")
