"""model/image_io.py: 16-bit, 32-bit int and float images scaled (not clipped) to 8 bits, every other mode converted as
transformers' convert_to_rgb does, files decoded upright, bad input named."""
import numpy as np
import pytest
from PIL import Image

from model.image_io import load_rgb, open_image, to_rgb

LEVELS16 = np.array([[0, 128, 129, 257, 1000], [20000, 40000, 65278, 65400, 65535]], dtype=np.uint16)


def _grey(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and (rgb == rgb[..., :1]).all(), "a grey image stays grey"
    return rgb[..., 0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(LEVELS16).save(tmp_path / "deep.png")
    image = open_image(tmp_path / "deep.png")
    assert image.mode == "I;16"
    want = np.rint(LEVELS16 / 257).astype(np.uint8)  # 65535 -> 255, 128 -> 0, 129 -> 1
    assert (_grey(image) == want).all()
    assert (np.asarray(load_rgb(tmp_path / "deep.png"))[..., 1] == want).all()
    # PIL alone clips: everything from 255 up is white.
    assert (np.asarray(image.convert("RGB"))[1] == 255).all()
    for mode in ("I;16B", "I;16L"):  # the byte orders TIFF and raw data give
        other = Image.frombytes(mode, LEVELS16.shape[::-1], LEVELS16.astype(">u2" if mode.endswith("B") else "<u2")
                                .tobytes())
        assert (_grey(other) == want).all(), mode


def test_32_bit_int_images():
    deep = Image.fromarray(LEVELS16.astype(np.int32))
    assert deep.mode == "I" and (_grey(deep) == np.rint(LEVELS16 / 257)).all()
    eight = np.array([[0, 7, 255]], dtype=np.int32)  # all within 0..255: taken as 8-bit levels
    assert (_grey(Image.fromarray(eight)) == eight).all()
    for bad in ([[-1, 5]], [[0, 70000]]):
        with pytest.raises(ValueError, match=r"mode-I image with values .*expected 8-bit"):
            to_rgb(Image.fromarray(np.array(bad, dtype=np.int32)))


def test_float_images():
    unit = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    assert (_grey(Image.fromarray(unit)) == [[0, 64, 128, 255]]).all()
    levels = np.array([[0.0, 3.4, 200.0, 255.0]], dtype=np.float32)
    assert (_grey(Image.fromarray(levels)) == [[0, 3, 200, 255]]).all()
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)))
    with pytest.raises(ValueError, match=r"values -0.5..1: expected the range"):
        to_rgb(Image.fromarray(np.array([[-0.5, 1.0]], dtype=np.float32)))


def test_transparency_key_of_a_16_bit_image(tmp_path):
    Image.fromarray(LEVELS16).save(tmp_path / "keyed.png", transparency=20000)
    grey = _grey(open_image(tmp_path / "keyed.png"))
    assert grey[1, 0] == 255, "the keyed pixel is composited onto white"
    assert grey[1, 1] == round(40000 / 257)
    rgb = np.asarray(to_rgb(open_image(tmp_path / "keyed.png"), alpha="drop"))
    assert rgb[1, 0, 0] == round(20000 / 257)


def _modes(seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    keyed = rgb.quantize(8)
    keyed.info["transparency"] = 2
    return {"RGB": rgb, "L": rgb.convert("L"), "1": rgb.convert("1"), "P": rgb.quantize(8), "P+transparency": keyed,
            "RGBA": Image.fromarray(rng.integers(0, 256, (13, 17, 4), dtype=np.uint8), "RGBA"),
            "LA": Image.fromarray(rng.integers(0, 256, (13, 17, 2), dtype=np.uint8), "LA"),
            "PA": rgb.quantize(8).convert("PA"), "CMYK": rgb.convert("CMYK"), "YCbCr": rgb.convert("YCbCr"),
            "LAB": rgb.convert("LAB")}


@pytest.mark.parametrize("mode", list(_modes()))
def test_8_bit_modes_convert_as_transformers_does(mode):
    transformers = pytest.importorskip("transformers")
    image = _modes()[mode]
    want = transformers.image_transforms.convert_to_rgb(image, return_numpy=True)
    got = to_rgb(image)
    assert got.mode == "RGB" and got.size == image.size
    assert np.array_equal(np.asarray(got), want), mode


def test_alpha_white_or_dropped():
    rgba = Image.fromarray(np.array([[[200, 0, 0, 0], [200, 0, 0, 255], [200, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    white = np.asarray(to_rgb(rgba))[0]
    assert white[0].tolist() == [255, 255, 255] and white[1].tolist() == [200, 0, 0]
    assert white[2].tolist() == [round(200 * 128 / 255 + 255 * 127 / 255)] + [127] * 2
    assert np.asarray(to_rgb(rgba, alpha="drop"))[0].tolist() == [[200, 0, 0]] * 3
    with pytest.raises(ValueError, match="alpha must be"):
        to_rgb(rgba, alpha="black")


def test_files_are_upright_and_bad_input_is_named(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.new("RGB", (40, 10), (0, 90, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (10, 40)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"):
        load_rgb(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="cannot convert a mode-La image"):
        to_rgb(Image.new("La", (2, 2)))
    with pytest.raises(TypeError, match="PIL image or a path"):
        load_rgb(np.zeros((2, 2, 3), np.uint8))
    assert to_rgb(Image.new("I;16", (0, 3))).size == (0, 3)
