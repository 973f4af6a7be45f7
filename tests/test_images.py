"""Decoding: every odd but valid image becomes RGB; every bad file is rejected with a reason."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from featcache.images import RejectedImage, load_image
from tests.conftest import write_image


def test_truncated_jpeg_is_rejected_as_corrupt(tmp_path):
    path = write_image(tmp_path / "a.jpg", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RejectedImage, match="corrupt or truncated"):
        load_image(path, 32)


def test_text_file_named_jpg_is_rejected_as_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(RejectedImage, match="not an image"):
        load_image(path, 32)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(RejectedImage, match="empty file"):
        load_image(path, 32)


def test_one_pixel_image_is_rejected_as_too_small(tmp_path):
    path = write_image(tmp_path / "dot.png", size=(1, 1))
    with pytest.raises(RejectedImage, match="too small .1x1 px"):
        load_image(path, 32)


def png_header_only(path, width, height, colour_type=2):
    """A PNG that declares width x height but holds 64 bytes of pixel data (a decompression bomb)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_huge_declared_dimensions_are_rejected_without_decoding(tmp_path):
    """A 100k x 100k PNG header (a decompression bomb) is refused from the header alone."""
    with pytest.raises(RejectedImage, match="too large"):
        load_image(png_header_only(tmp_path / "bomb.png", 100_000, 100_000), 32)


def test_featcaches_own_100_megapixel_limit_refuses_what_pillow_would_open(tmp_path, monkeypatch):
    """144 MP is over featcache's limit and under Pillow's bomb error (twice its MAX_IMAGE_PIXELS);
    with Pillow's check off, only featcache's own check stands between the header and a decode."""
    assert 12_000 * 12_000 < 2 * Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = png_header_only(tmp_path / "big.png", 12_000, 12_000, colour_type=0)  # grey: 144 MB decoded
    with pytest.raises(RejectedImage, match=r"^too large \(12000x12000 px; limit 100 MP\)$"):
        load_image(path, 32)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (20, 20), 77).save(path)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == 77).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (24, 24), (220, 30, 30)).convert("CMYK").save(path, quality=95)
    out = load_image(path, 16).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.mean(axis=(0, 1)) - (220, 30, 30)).max() < 12


def test_rgba_png_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(path)
    assert (load_image(path, 16) == 255).all()


def test_palette_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (20, 20), c).convert("P") for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(path, 16).astype(int)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50


def test_exif_orientation_is_applied(tmp_path):
    """Orientation 6 means 'rotate 90 degrees clockwise to display'; we must see it displayed."""
    left_red = np.zeros((30, 60, 3), np.uint8)
    left_red[:, :30] = (255, 0, 0)
    left_red[:, 30:] = (0, 0, 255)
    photo = Image.fromarray(left_red)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_file = tmp_path / "rotated.jpg"
    photo.save(rotated_file, exif=exif, quality=95)
    displayed = tmp_path / "displayed.png"
    photo.transpose(Image.Transpose.ROTATE_270).save(displayed)
    out, expected = load_image(rotated_file, 32).astype(int), load_image(displayed, 32).astype(int)
    assert np.abs(out - expected).mean() < 10
    assert out[:8, :, 0].mean() > 200  # red ends up on top after a clockwise turn


def test_webp_and_bmp_decode(tmp_path):
    for fmt, name in (("WEBP", "a.webp"), ("BMP", "a.bmp")):
        path = write_image(tmp_path / name, (10, 200, 10), fmt=fmt)
        assert load_image(path, 16)[..., 1].mean() > 150


def test_real_photo_squash_and_crop_differ(tmp_path):
    """A real non-square photo (scikit-image's cat, 451x300): crop keeps the aspect, squash does not."""
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(skimage_data.chelsea()).save(path)
    squash, crop = load_image(path, 64, "squash"), load_image(path, 64, "crop")
    assert squash.shape == crop.shape == (64, 64, 3)
    assert np.abs(squash.astype(int) - crop.astype(int)).mean() > 5


def test_unexpected_decoder_error_is_a_reject_not_a_crash(tmp_path, monkeypatch):
    path = write_image(tmp_path / "odd.png")

    def broken_plugin(*args, **kwargs):
        raise IndexError("tile index out of range")

    monkeypatch.setattr(Image, "open", broken_plugin)
    with pytest.raises(RejectedImage, match="cannot decode .IndexError: tile index out of range"):
        load_image(path, 32)


@pytest.mark.parametrize("wide", [True, False])
def test_crop_takes_the_centred_square(tmp_path, wide):
    """Thirds of a 90x30 (or 30x90) image coloured red, green, blue: the crop sees only the green one."""
    thirds = np.zeros((30, 90, 3), np.uint8)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        thirds[:, 30 * i: 30 * (i + 1)] = colour
    path = tmp_path / "thirds.png"
    Image.fromarray(thirds if wide else thirds.transpose(1, 0, 2)).save(path)
    crop = load_image(path, 16, "crop")
    seen = f"the crop's mean colour is {crop.mean(axis=(0, 1)).round().tolist()}, not green"
    assert (crop[1:-1, 1:-1] == (0, 255, 0)).all(), seen  # its border pixels blend in a little of the rest
    assert np.abs(crop.mean(axis=(0, 1)) - (0, 255, 0)).max() < 10
    squash = load_image(path, 16, "squash")  # all three colours, in order
    ends = (squash[:, 0], squash[:, -1]) if wide else (squash[0], squash[-1])
    assert (ends[0] == (255, 0, 0)).all() and (ends[1] == (0, 0, 255)).all()
