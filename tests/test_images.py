"""One image case per test, checked on pixel values: what `decode` makes of each file a user has
(colour modes, transparency, 16-bit, EXIF rotation, resize policies), and the reason code of each
file it must refuse."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, features

from components.data.images import IMAGE_EXTENSIONS, BadImage, decode
from tests.support.formats import (
    exif_rotated_jpeg,
    noise,
    png_bilevel,
    png_broken_stream,
    write_image,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255,) * 3, (0, 0, 0)


def solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


def halves(size, left, right, mode="RGB"):
    """Left half one colour, right half another."""
    img = Image.new(mode, size, left)
    w, h = size
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def run(path, size=16, channels=3, resize="crop", min_side=8):
    out = decode(path, size, channels, resize, min_side)
    assert out.shape == (size, size, channels) and out.dtype == np.uint8
    return out


def close(pixel, colour, tol=8):
    return np.all(np.abs(pixel.astype(int) - np.array(colour)) <= tol)


# --- colour modes ---------------------------------------------------------------------------


def test_rgb_png_is_kept_exactly(tmp_path):
    img = noise(16, 16, seed=1)
    out = run(write_image(tmp_path / "a.png", img))
    np.testing.assert_array_equal(out, np.asarray(img))


def test_rgba_transparent_becomes_white(tmp_path):
    img = halves((16, 16), (0, 0, 255, 255), (255, 0, 0, 0), "RGBA")  # right: invisible red
    out = run(write_image(tmp_path / "a.png", img))
    assert close(out[8, 3], BLUE, 0)
    assert close(out[8, 12], WHITE, 0)


def test_rgba_half_transparent_blends_with_white(tmp_path):
    out = run(write_image(tmp_path / "a.png", solid((16, 16), (0, 0, 0, 128), "RGBA")))
    assert close(out[8, 8], (127, 127, 127), 2)


def test_grey_with_alpha_becomes_white_where_transparent(tmp_path):
    img = halves((16, 16), (0, 255), (0, 0), "LA")
    out = run(write_image(tmp_path / "a.png", img))
    assert close(out[8, 3], BLACK, 0)
    assert close(out[8, 12], WHITE, 0)


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_becomes_white(tmp_path, suffix):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    img.paste(1, (0, 0, 16, 8))  # top half green
    out = run(write_image(tmp_path / f"a{suffix}", img, transparency=0))
    assert close(out[3, 8], GREEN, 0)
    assert close(out[12, 8], WHITE, 0)


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    img = halves((16, 16), RED, BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    out = run(write_image(tmp_path / "a.png", img))
    assert close(out[8, 3], RED, 0) and close(out[8, 12], BLUE, 0)


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_red_stays_red(tmp_path, suffix):
    img = halves((16, 16), (0, 255, 255, 0), (255, 255, 0, 0), "CMYK")  # red | blue in ink
    args = {"quality": 95} if suffix == ".jpg" else {}
    out = run(write_image(tmp_path / f"a{suffix}", img, **args))
    assert close(out[8, 2], RED, 12), out[8, 2]
    assert close(out[8, 13], BLUE, 12), out[8, 13]


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.zeros((16, 16), dtype=np.uint16)
    a[:, 4:8], a[:, 8:12], a[:, 12:] = 257 * 100, 32896, 65535  # 100, 128, 255 on 8 bits
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    path = write_image(tmp_path / "a.png", img)
    out = run(path, channels=1)
    assert [int(out[8, c, 0]) for c in (2, 6, 10, 14)] == [0, 100, 128, 255]
    rgb = run(path, channels=3)
    assert close(rgb[8, 6], (100, 100, 100), 0)


def test_32bit_integer_grey_is_scaled(tmp_path):
    # Some scientific TIFFs are 32-bit integers holding 16-bit values.
    a = np.zeros((16, 16), dtype=np.int32)
    a[:, 8:] = 65535
    a[:, 4:8] = 257 * 50
    out = run(write_image(tmp_path / "a.tif", Image.fromarray(a, "I")), channels=1)
    assert [int(out[8, c, 0]) for c in (2, 6, 12)] == [0, 50, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = solid((16, 16), BLUE)
    img.paste(solid((8, 8), RED), (0, 0))  # red in the stored top-left corner
    path = exif_rotated_jpeg(tmp_path / "a.jpg", img, orientation=6)  # "rotate 90° clockwise"
    out = run(path)
    assert close(out[3, 12], RED, 40), out[3, 12]  # shown at the top right
    assert close(out[3, 3], BLUE, 40), out[3, 3]


def test_exif_orientation_changes_the_shape_before_resizing(tmp_path):
    # Stored 32 wide × 16 high (left half red, right half green), shown 16 wide × 32 high with
    # red on top: the crop must cut the shown image, giving red over green, not red beside green.
    img = halves((32, 16), RED, GREEN)
    out = run(exif_rotated_jpeg(tmp_path / "a.jpg", img, orientation=6))
    assert close(out[2, 3], RED, 40) and close(out[2, 12], RED, 40)
    assert close(out[13, 3], GREEN, 40) and close(out[13, 12], GREEN, 40)


def test_grey_image_gives_three_equal_channels(tmp_path):
    out = run(write_image(tmp_path / "a.png", solid((16, 16), 77, "L")))
    assert close(out[8, 8], (77, 77, 77), 0)


def test_rgb_to_one_channel_is_luma(tmp_path):
    path = write_image(tmp_path / "a.png", halves((16, 16), RED, GREEN))
    out = run(path, channels=1)
    # ITU-R 601 luma: 0.299 R + 0.587 G + 0.114 B
    assert abs(int(out[8, 3, 0]) - 76) <= 1
    assert abs(int(out[8, 12, 0]) - 150) <= 1


def test_transparent_to_one_channel_is_white(tmp_path):
    img = halves((16, 16), (255, 0, 0, 255), (255, 0, 0, 0), "RGBA")
    out = run(write_image(tmp_path / "a.png", img), channels=1)
    assert abs(int(out[8, 3, 0]) - 76) <= 1
    assert int(out[8, 12, 0]) == 255


def test_bilevel_image(tmp_path):
    img = halves((16, 16), 0, 255, "L").convert("1")
    out = run(write_image(tmp_path / "a.png", img))
    assert close(out[8, 3], BLACK, 0) and close(out[8, 12], WHITE, 0)


@pytest.mark.parametrize("suffix", sorted(IMAGE_EXTENSIONS))
def test_every_extension_decodes(tmp_path, suffix):
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    img = halves((16, 16), RED, BLUE)
    args = {"quality": 95} if suffix in (".jpg", ".jpeg") else {}
    args |= {"lossless": True} if suffix == ".webp" else {}
    out = run(write_image(tmp_path / f"a{suffix.upper()}", img, **args))
    assert close(out[8, 2], RED, 20) and close(out[8, 13], BLUE, 20)


# --- resize policies ------------------------------------------------------------------------


def bands(w, h):
    """Green, red, blue, green in four equal bands along the long side."""
    img = Image.new("RGB", (w, h))
    step = max(w, h) // 4
    for i, colour in enumerate((GREEN, RED, BLUE, GREEN)):
        box = (i * step, 0, (i + 1) * step, h) if w > h else (0, i * step, w, (i + 1) * step)
        img.paste(solid((box[2] - box[0], box[3] - box[1]), colour), box[:2])
    return img


def test_crop_scales_the_short_side_and_keeps_the_centre(tmp_path):
    out = run(write_image(tmp_path / "wide.png", bands(32, 16)), resize="crop")
    assert close(out[8, 3], RED, 10) and close(out[8, 12], BLUE, 10)
    assert not any(close(out[r, c], GREEN, 60) for r in (0, 8, 15) for c in (0, 15))
    tall = run(write_image(tmp_path / "tall.png", bands(16, 32)), resize="crop")
    assert close(tall[3, 8], RED, 10) and close(tall[12, 8], BLUE, 10)


def test_crop_of_a_large_image_scales_down(tmp_path):
    img = bands(128, 64)
    out = run(write_image(tmp_path / "big.png", img), resize="crop")
    assert close(out[8, 3], RED, 10) and close(out[8, 12], BLUE, 10)


def test_pad_fits_inside_and_pads_white(tmp_path):
    out = run(write_image(tmp_path / "wide.png", bands(32, 16)), resize="pad")
    assert np.all(out[:3] == 255) and np.all(out[13:] == 255)  # 16×8 content in rows 4..11
    assert close(out[8, 1], GREEN, 40) and close(out[8, 14], GREEN, 40)
    assert close(out[8, 5], RED, 60) and close(out[8, 10], BLUE, 60)
    tall = run(write_image(tmp_path / "tall.png", bands(16, 32)), resize="pad")
    assert np.all(tall[:, :3] == 255) and np.all(tall[:, 13:] == 255)
    assert close(tall[1, 8], GREEN, 40)


def test_pad_is_white_in_one_channel_too(tmp_path):
    out = run(write_image(tmp_path / "wide.png", bands(32, 16)), channels=1, resize="pad")
    assert np.all(out[:3] == 255) and np.all(out[13:] == 255)


def test_stretch_keeps_everything_and_distorts(tmp_path):
    out = run(write_image(tmp_path / "wide.png", bands(32, 16)), resize="stretch")
    assert close(out[8, 1], GREEN, 40) and close(out[8, 14], GREEN, 40)
    assert close(out[8, 5], RED, 60) and close(out[8, 10], BLUE, 60)
    assert close(out[0, 5], RED, 60) and close(out[15, 10], BLUE, 60)  # no padding rows


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [8, 24])
def test_every_policy_gives_the_requested_shape(tmp_path, resize, size):
    path = write_image(tmp_path / "odd.jpg", noise(37, 13, seed=3))
    for channels in (1, 3):
        assert decode(path, size, channels, resize, 8).shape == (size, size, channels)


# --- refused files --------------------------------------------------------------------------


def reason(path, **kw):
    with pytest.raises(BadImage) as info:
        decode(path, kw.get("size", 16), 3, "crop", kw.get("min_side", 8))
    assert info.value.detail  # every refusal says more than its code
    return info.value.reason


def test_zero_byte_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    assert reason(tmp_path / "a.png") == "empty"


@pytest.mark.parametrize("data", [b"hello, not a picture\n" * 3,
                                  b"<!doctype html><html><body>Not found</body></html>"])
def test_not_an_image(tmp_path, data):
    (tmp_path / "a.jpg").write_bytes(data)
    assert reason(tmp_path / "a.jpg") == "not_an_image"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp"])
def test_truncated(tmp_path, suffix):
    full = write_image(tmp_path / f"full{suffix}", noise(40, 40, seed=5))
    data = full.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    assert reason(tmp_path / f"cut{suffix}") == "corrupt"


def test_broken_compressed_data(tmp_path):
    (tmp_path / "a.png").write_bytes(png_broken_stream(noise(20, 20, seed=6)))
    assert reason(tmp_path / "a.png") == "corrupt"


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bilevel(9500, 9500))  # 90 M pixels, 11 KB
    assert reason(tmp_path / "bomb.png") == "decompression_bomb"


@pytest.mark.parametrize("size", [(5, 5), (40, 6), (6, 40)])
def test_too_small_on_either_side(tmp_path, size):
    path = write_image(tmp_path / "a.png", noise(*size, seed=7))
    assert reason(path, min_side=8) == "too_small"


def test_min_side_is_inclusive(tmp_path):
    path = write_image(tmp_path / "a.png", noise(8, 8, seed=8))
    assert decode(path, 16, 3, "crop", 8).shape == (16, 16, 3)


# --- bytes, as a request to the served model carries them -------------------------------------


def test_bytes_decode_as_their_file_does(tmp_path):
    path = write_image(tmp_path / "a.png", noise(30, 20, seed=9))
    for resize in ("crop", "pad", "stretch"):
        assert np.array_equal(decode(path.read_bytes(), 16, 3, resize, 8),
                              decode(path, 16, 3, resize, 8))
    with pytest.raises(BadImage, match="empty"):
        decode(b"", 16, 3, "crop", 8)
    with pytest.raises(BadImage, match="decompression_bomb"):
        decode(png_bilevel(9500, 9500), 16, 3, "crop", 8)


def test_formats_limit_what_is_opened(tmp_path):
    gif = write_image(tmp_path / "a.gif", noise(20, 20, seed=10)).read_bytes()
    with pytest.raises(BadImage) as info:
        decode(gif, 16, 3, "crop", 8, formats=("PNG", "JPEG"))
    assert info.value.reason == "not_an_image" and info.value.detail == "not a PNG, JPEG image"
    assert decode(gif, 16, 3, "crop", 8).shape == (16, 16, 3)  # without the limit: any format
