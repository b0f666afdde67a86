import numpy as np
import pytest
from PIL import Image

from components.data import images
from components.data.images import SkipImage, load_image


def _gradient(w=40, h=30) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float64)[:, None, None]
    return np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                           np.full((h, w, 1), 90.0)], axis=2).astype(np.uint8)


def test_rgba_with_transparency_keeps_alpha_as_mask(tmp_path):
    rgb = _gradient()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[5:25, 10:30] = 255
    alpha[4, 10:30] = 128
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 512)
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (30, 40, 3)
    assert out.alpha is not None and out.alpha[4, 15] == pytest.approx(128 / 255)
    # opaque pixels keep their colour; transparent ones are shown on white
    assert np.array_equal(out.rgb[10, 15], rgb[10, 15])
    assert np.array_equal(out.rgb[0, 0], [255, 255, 255])


def test_opaque_rgba_has_no_mask(tmp_path):
    rgb = _gradient()
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 512)
    assert out.alpha is None and np.array_equal(out.rgb, rgb)


def test_la_grayscale_and_bilevel(tmp_path):
    gray = _gradient()[..., 0]
    Image.fromarray(np.dstack([gray, np.full_like(gray, 200)]), "LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png", 512)
    assert out.rgb.shape == (30, 40, 3) and out.alpha is not None
    assert np.allclose(out.alpha, 200 / 255)

    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png", 512)
    assert np.array_equal(out.rgb, np.repeat(gray[..., None], 3, axis=2)) and out.alpha is None

    Image.fromarray(gray > 128).convert("1").save(tmp_path / "b.png")
    out = load_image(tmp_path / "b.png", 512)
    assert set(np.unique(out.rgb)) <= {0, 255} and out.rgb.shape == (30, 40, 3)


def test_palette_with_and_without_transparency(tmp_path):
    rgb = _gradient()
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png", 512)
    assert out.alpha is None
    assert np.array_equal(out.rgb, np.asarray(pal.convert("RGB")))

    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png", 512)
    index0 = np.asarray(pal) == 0
    assert out.alpha is not None and np.all(out.alpha[index0] == 0) and np.all(out.alpha[~index0] == 1)


def test_cmyk_jpeg(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = load_image(tmp_path / "c.jpg", 512)
    assert out.rgb.shape == (30, 40, 3)
    assert np.abs(out.rgb.astype(int) - rgb.astype(int)).mean() < 12


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png", 512)
    assert out.rgb.dtype == np.uint8
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(out.rgb[..., 0].astype(int) - expected).max() <= 1
    assert out.rgb.max() == 255 and out.rgb.min() == 0  # full range kept, not clipped to 255


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((20, 60, 3), np.uint8)
    rgb[:, :10] = [255, 0, 0]  # red band on the left of the stored pixels
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg", 512)
    assert out.rgb.shape == (60, 20, 3)  # displayed upright: portrait
    assert out.rgb[2, 10, 0] > 200 and out.rgb[-3, 10, 0] < 60  # the band is now on top


def test_longest_side_capped(tmp_path):
    Image.fromarray(np.zeros((300, 900, 3), np.uint8)).save(tmp_path / "big.png")
    out = load_image(tmp_path / "big.png", 90)
    assert out.rgb.shape == (30, 90, 3)


def test_corrupt_truncated_and_non_images(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(SkipImage) as err:
        load_image(tmp_path / "notes.txt", 512)
    assert err.value.reason == images.NOT_AN_IMAGE

    Image.fromarray(_gradient(200, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SkipImage) as err:
        load_image(tmp_path / "cut.jpg", 512)
    assert err.value.reason == images.TRUNCATED

    Image.fromarray(_gradient(64, 64)).save(tmp_path / "full.png")
    png = bytearray((tmp_path / "full.png").read_bytes())
    png[60:80] = b"\x00" * 20  # clobber IDAT data: decodes to garbage or fails the CRC
    (tmp_path / "bad.png").write_bytes(bytes(png))
    with pytest.raises(SkipImage) as err:
        load_image(tmp_path / "bad.png", 512)
    assert err.value.reason in (images.CORRUPT, images.TRUNCATED)


def test_pixel_hash_is_content_based(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    a, b = load_image(tmp_path / "a.png", 512), load_image(tmp_path / "b.bmp", 512)
    assert a.content_hash == b.content_hash
    assert images.pixel_hash(rgb[:, :-1]) != a.content_hash
