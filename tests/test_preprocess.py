"""Test-time preprocessing and visualisation helpers."""

from __future__ import annotations

import functools
import math
import os
import re

import numpy as np
import pytest
import torch

from denseclip_fast.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    exif_orientation,
    image_files,
    image_size,
    keep_ratio_size,
    load_image,
    normalize,
    pil_to_rgb,
    prepare,
    resize_bilinear_uint8,
    resize_keep_ratio,
    resize_nearest,
    to_tensor,
)
from denseclip_fast.visualize import colorize, default_palette, overlay


@pytest.mark.parametrize(
    "hw, scale, expected",
    [
        ((512, 683), (2048, 512), (512, 683)),  # a typical ADE20K image is already at scale
        ((256, 256), (2048, 512), (512, 512)),  # short side limits
        ((500, 2000), (2048, 512), (512, 2048)),  # both limits at once
        ((100, 3000), (2048, 512), (68, 2048)),  # long side limits: 100 * 2048/3000 = 68.27
        ((333, 500), (2048, 640), (640, 961)),  # ViT scale: 500 * 640/333 = 960.96 -> 961
        ((300, 3000), (2048, 512), (205, 2048)),  # the height rounds too: 300 * 2048/3000 = 204.8 -> 205
        # halves round up as mmcv's int(x + 0.5), not to even as Python's round(): 2049 * 0.5 = 1024.5 -> 1025,
        # 5 * 0.5 = 2.5 -> 3
        ((1024, 2049), (2048, 512), (512, 1025)),
        ((5, 8), (4, 4), (3, 4)),
        # portrait images (a phone's photo, one turned upright by its EXIF orientation): the long side is the height
        ((683, 512), (2048, 512), (683, 512)),
        ((3000, 100), (2048, 512), (2048, 68)),
        ((500, 333), (640, 2048), (961, 640)),  # the scale's sides in either order: 500 * 640/333 = 960.96
    ],
)
def test_keep_ratio_size_is_mmcv_rescale_size(hw, scale, expected):
    assert keep_ratio_size(*hw, scale) == expected


def test_prepare_resizes_rounds_and_normalises():
    image = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    x = prepare(image, (2048, 512))
    assert x.shape == (1, 3, 512, 768)
    pixels = x * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # a uint8 image after resizing, like OpenCV's
    same = prepare(np.zeros((512, 512, 3), np.uint8), (2048, 512))
    assert torch.allclose(same[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    assert torch.allclose(
        normalize(torch.full((1, 3, 2, 2), 255.0))[0, 0, 0, 0], torch.tensor((255 - CLIP_MEAN[0]) / CLIP_STD[0])
    )


def test_normalisation_uses_clips_rgb_mean_and_std():
    """CLIP's published mean and std, in RGB order (not BGR as OpenCV reads images): a pure red, green or blue
    image normalises to (255 - mean_c) / std_c in its own channel and -mean_c / std_c in the others."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64) * 255
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64) * 255
    for c in range(3):
        image = np.zeros((2, 2, 3), np.uint8)
        image[..., c] = 255
        got = normalize(to_tensor(image))[0, :, 0, 0].double()
        expected = -mean / std
        expected[c] = (255 - mean[c]) / std[c]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_sizes_and_paths_that_are_not_images_are_named():
    """keep_ratio_size of an empty image divided by zero; load_image(None) was os's TypeError."""
    with pytest.raises(ValueError, match="the image size must be at least 1 x 1, got 0 x 5"):
        keep_ratio_size(0, 5, (2048, 512))
    for path in (None, b"x.png", ""):
        with pytest.raises(ValueError, match="path must be a non-empty str or os.PathLike"):
            load_image(path)  # type: ignore[arg-type]
    for paths, shown in [(b"photos", "bytes b'photos'"), (["a.png", 3], "int 3"), ([None], "NoneType None")]:
        with pytest.raises(ValueError, match=re.escape(f"paths must be a path (str or os.PathLike) or a sequence of "
                                                       f"them, as load_image takes, got {shown}")):  # fmt: skip
            image_files(paths)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [(512,), 512, "ab", (512.5, 100), (math.inf, 512), (math.nan, 512), (-5, 512),
                                   (0, 512), (True, 512), (2048, 512, 1)])  # fmt: skip
def test_a_scale_other_than_two_positive_ints_is_refused_by_name(scale):
    """(512,) was taken for both sides, 512.5 and inf as sizes; (-5, 512) was refused as a size of (-4, -5), "ab"
    and NaN with Python's TypeError or ValueError."""
    image = np.zeros((40, 60, 3), np.uint8)
    for call in (lambda: keep_ratio_size(40, 60, scale), lambda: prepare(image, scale),
                 lambda: resize_keep_ratio(torch.from_numpy(image).permute(2, 0, 1)[None], scale)):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"scale must be two ints >= 1 (the long and the short side "
                                                       f"to fit, as mmseg's img_scale (2048, 512)), got {scale!r}")):
            call()
    assert keep_ratio_size(40, 60, np.array([512, 2048])) == keep_ratio_size(40, 60, [2048, 512]) == (512, 768)


def test_normalize_keep_ratio_is_the_resize_then_normalize():
    """normalize_keep_ratio equals normalize(resize_keep_ratio(x)) bit for bit: a uint8 batch the scale leaves at its
    size (normalised from its uint8 values), one it resizes, and a float batch at its size (still rounded to uint8
    values by the resize); not an RGB batch: the same error."""
    from denseclip_fast.preprocess import normalize_keep_ratio

    rng = np.random.default_rng(7)
    at_size = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 32, 128), dtype=np.uint8))
    other = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 40, 50), dtype=np.uint8))
    fractions = at_size.float() + 0.4
    for x in (at_size, other, fractions):
        assert torch.equal(normalize_keep_ratio(x, (128, 32)), normalize(resize_keep_ratio(x, (128, 32))))
    assert not torch.equal(normalize_keep_ratio(fractions, (128, 32)), normalize(fractions))
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, H, W\) batch"):
        normalize_keep_ratio(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), (128, 32))


def test_normalize_and_resize_keep_ratio_take_rgb_batches_only():
    """Integer batches are normalised in float32 (uint8 arithmetic truncated CLIP's mean and std and wrapped below
    zero: up to 3.9 off); an (H, W, 3) image, a 1- or 4-channel batch are refused, naming x, where they were
    broadcast or resized as channels into a wrong result."""
    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = normalize(pixels.double())
    for dtype in (torch.uint8, torch.int64):
        got = normalize(pixels.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(got, normalize(pixels.float()))  # as converting first, bit for bit
    assert normalize(pixels.half()).dtype == torch.float16
    for bad in (torch.zeros(1, 1, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(64, 80, 3), torch.zeros(1, 64, 80, 3)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"x must be a \(B, 3, H, W\) batch .*got shape {shape}"):
            normalize(bad)
        with pytest.raises(ValueError, match=r"x must be a \(B, 3, H, W\) batch"):
            resize_keep_ratio(bad.to(torch.uint8), (128, 64))
    with pytest.raises(ValueError, match="got ndarray"):
        normalize(np.zeros((1, 3, 2, 2), np.float32))


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\) uint8 RGB, got shape \(10, 10\)"),
        (np.zeros((10, 10, 3), np.float32), "dtype torch.float32"),
        (np.zeros((0, 10, 3), np.uint8), "zero size"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        to_tensor(image)


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png: no such image file"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        load_image(bad)
    # a file named with a trailing '/' is told so (it was "no such image file", or "not a readable image (Not a
    # directory)" when read)
    message = re.escape(f"{bad}/: a file named as a directory (a trailing '/'); pass {bad}")
    for read in (load_image, image_files):
        with pytest.raises(ValueError, match=message):
            read(f"{bad}/")


def test_decompression_bombs_are_refused_naming_the_file(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS (a small file that would decode to gigabytes):
    kept, but as the one-line ValueError naming the file and the remedy (was a DecompressionBombError traceback
    in segment and in train's header check)."""
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 60)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    from denseclip_fast.train.data import read_label

    Image.new("L", (100, 60)).save(tmp_path / "label.png")
    with pytest.raises(ValueError, match=r"label.png: Image size \(6000 pixels\) exceeds limit"):
        read_label(str(tmp_path / "label.png"), 3, False)
    for read in (load_image, image_size):
        with pytest.raises(ValueError, match=r"huge.png: Image size \(6000 pixels\) exceeds limit.* If you trust it, "
                                             r"downscale it, or from Python raise PIL.Image.MAX_IMAGE_PIXELS"):
            read(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_paths_that_are_not_regular_files_are_refused_not_read(tmp_path):
    """A FIFO (reading it would block until a writer comes) is refused by name, among image_files' paths and by
    load_image/image_size; in a directory image_files skips it. A bare path is one path, not one per character."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ValueError, match="pipe.png: not a regular file or a directory"):
        image_files([tmp_path / "a.png", tmp_path / "pipe.png"])
    for read in (load_image, image_size):
        with pytest.raises(ValueError, match="pipe.png: not a regular file"):
            read(tmp_path / "pipe.png")
    assert image_files([tmp_path]) == [str(tmp_path / "a.png")]
    assert image_files(str(tmp_path)) == image_files(tmp_path) == [str(tmp_path / "a.png")]
    assert image_files(str(tmp_path / "a.png")) == [str(tmp_path / "a.png")]


def test_a_folder_lists_images_of_any_extension_case_sorted_by_name(tmp_path):
    """Cameras name their files IMG_0001.JPG: a folder's images are found whatever the case of their extension,
    listed in name order (the order segment writes and reports them in), and its other files left out."""
    for name in ("c.png", "IMG_0001.JPG", "b.Jpeg", "a.TIF", "notes.txt", "d.webp.bak"):
        (tmp_path / name).write_bytes(b"")
    assert image_files(tmp_path) == [str(tmp_path / n) for n in ("IMG_0001.JPG", "a.TIF", "b.Jpeg", "c.png")]


def test_hidden_files_in_a_folder_are_left_out(tmp_path):
    """macOS's ._NAME.jpg resource forks (and other hidden files) in a folder of images are no images: segment
    stopped at the first one; given by name, a hidden file is read as any file."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble's magic number
    assert image_files(tmp_path) == [str(tmp_path / "a.jpg")]
    assert image_files([tmp_path / "._a.jpg"]) == [str(tmp_path / "._a.jpg")]


def test_broken_links_are_named_not_skipped(tmp_path):
    """A symbolic link to a missing image, in a listed folder or given, is refused by name before any work (it was
    left out silently); a link to an image is listed as the image."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    assert image_files(tmp_path) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    os.symlink(tmp_path / "gone.jpg", tmp_path / "c.jpg")
    for given in (tmp_path, tmp_path / "c.jpg"):
        with pytest.raises(ValueError, match=r"c.jpg: a symbolic link whose target cannot be reached \(.*gone.jpg: "):
            image_files(given)
    os.symlink(tmp_path / "gone", tmp_path / "notes.txt")  # no image extension: not an image, not listed
    os.remove(tmp_path / "c.jpg")
    assert image_files(tmp_path) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_load_image_reads_as_opencv_does(tmp_path):
    """As mmcv's default loader (cv2.imdecode, IMREAD_COLOR): the EXIF orientation applied, 16-bit grey reduced to
    its high byte, grey and RGBA made RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored rows are the picture's right edge; upright is 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "rotated.png", exif=exif)
    assert np.array_equal(load_image(tmp_path / "rotated.png"), np.rot90(rgb, k=-1))
    deep = rng.integers(0, 65536, size=(7, 9), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(load_image(tmp_path / "deep.png"), np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(load_image(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, 2))
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "alpha.png")
    assert np.array_equal(load_image(tmp_path / "alpha.png"), rgb)  # alpha dropped, not blended
    for name in ("deep.png", "grey.png", "alpha.png"):  # image_size: load_image's, from the header
        assert image_size(tmp_path / name) == load_image(tmp_path / name).shape[:2], name
    assert image_size(tmp_path / "rotated.png") == (20, 30)  # as stored: the EXIF orientation is not read
    assert image_size(tmp_path / "rotated.png", upright=True) == (30, 20)  # as load_image returns it
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    assert image_size(tmp_path / "rotated.jpg", upright=True) == load_image(tmp_path / "rotated.jpg").shape[:2]
    # a TIFF: Pillow gives its size upright and turns its pixels as it loads them, dropping the tag (image_size
    # swapped the sides a second time, and exif_orientation said 1, so a label stored as the image was passed)
    for name in ("rotated.tif", "rotated.webp"):
        Image.fromarray(rgb).save(tmp_path / name, exif=exif, lossless=True)  # (lossless: a WebP option)
        assert np.array_equal(load_image(tmp_path / name), np.rot90(rgb, k=-1)), name
        assert image_size(tmp_path / name) == (20, 30) and image_size(tmp_path / name, upright=True) == (30, 20), name
    for name in ("rotated.png", "rotated.jpg", "rotated.tif", "rotated.webp", "deep.png"):  # the header alone too
        assert exif_orientation(tmp_path / name) == exif_orientation(tmp_path / name, header_only=True)
        assert exif_orientation(tmp_path / name) == (1 if name == "deep.png" else 6)
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "deep32.tif")  # mode "I", as older Pillows read 16-bit PNGs
    assert np.array_equal(load_image(tmp_path / "deep32.tif"), load_image(tmp_path / "deep.png"))
    # made in memory (the Segmenter's PIL input), a 32-bit image keeps Pillow's values; a 16-bit one its high byte
    assert (pil_to_rgb(Image.fromarray(np.full((2, 3), 200, np.int32)), "x") == 200).all()
    assert (pil_to_rgb(Image.fromarray(np.full((2, 3), 40000, np.uint16)), "x") == 156).all()
    with pytest.raises(ValueError, match="missing.png: no such image file"):
        image_size(tmp_path / "missing.png")
    Image.fromarray(rgb).save(tmp_path / "bad_exif.png", exif=b"Exif\x00\x00not a TIFF block")  # Pillow: SyntaxError
    for read in (load_image, exif_orientation, lambda path: image_size(path, upright=True)):
        with pytest.raises(ValueError, match=r"bad_exif.png: not a readable image \(not a TIFF file"):
            read(tmp_path / "bad_exif.png")


# EXIF orientation -> the upright picture of the stored pixels (the EXIF / TIFF specification's eight cases)
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, k=-1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, k=1)}  # fmt: skip


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_read_and_sized_as_load_image_turns_it(tmp_path, orientation):
    """Each of the eight EXIF orientations, in each format that carries one: load_image returns the upright picture
    (checked pixel for pixel where the format is lossless), exif_orientation names the tag, from the header alone
    too, and image_size gives the stored size, or with upright=True load_image's: the sides swapped for the four
    orientations that transpose (5 to 8), which train's label-size check compares a label with."""
    from PIL import Image

    rgb = np.random.default_rng(orientation).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright = UPRIGHT[orientation](rgb)
    for name in ("image.png", "image.jpg", "image.tif", "image.webp"):
        path = tmp_path / name
        Image.fromarray(rgb).save(path, exif=exif, lossless=True)  # (lossless: a WebP option)
        loaded = load_image(path)
        assert loaded.shape == upright.shape, name
        assert name == "image.jpg" or np.array_equal(loaded, upright), name
        assert exif_orientation(path) == exif_orientation(path, header_only=True) == orientation, name
        assert image_size(path) == (20, 30) and image_size(path, upright=True) == upright.shape[:2], name


def test_palette_colorize_overlay():
    palette = default_palette(150)
    assert len(set(palette)) == 150
    labels = np.array([[0, 1], [2, 149]])
    colors = colorize(labels, palette)
    assert colors.shape == (2, 2, 3) and tuple(colors[1, 1]) == palette[149]
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, labels, palette, alpha=0.0)
    assert np.array_equal(blended, image)
    assert np.array_equal(overlay(image, labels, palette, alpha=1.0), colors)
    with pytest.raises(ValueError, match="exceeds the palette of 150"):
        colorize(np.array([[150]]), palette)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(np.zeros((3, 3, 3), np.uint8), labels, palette)
    # 255, no class of a 150-colour palette: a ground truth's unlabelled pixel, left unpainted; a class of a
    # 256-colour one: painted
    truth = np.array([[0, 255], [255, 149]], dtype=np.uint8)
    painted = overlay(image, truth, palette, alpha=1.0)
    assert np.array_equal(painted[0, 1], image[0, 1]) and tuple(painted[1, 1]) == palette[149]
    assert tuple(overlay(image, truth, default_palette(256), alpha=1.0)[0, 1]) == default_palette(256)[255]
    with pytest.raises(ValueError, match="exceeds the palette of 150"):
        overlay(image, truth, palette, ignore_index=None)
    for bad in ("255", -1, 1.5, True):  # a value no label holds: named, as train's ignore_index is
        with pytest.raises(ValueError, match=r"ignore_index must be a label value in 0..65535 .*got "):
            overlay(image, truth, palette, ignore_index=bad)


def test_overlay_rounds_the_blend_and_leaves_out_the_first_value_past_the_palette():
    """The blend ``(1 - alpha) * image + alpha * colour`` is rounded half up, not truncated (0.5 * 0 + 0.5 * 255 =
    127.5 -> 128; 0.75 * 10 + 0.25 * 255 = 71.25 -> 71; 0.25 * 3 + 0.75 * 200 = 150.75 -> 151); and ignore_index
    equal to the palette's length (255 with 255 colours: classes 0..254) is no class, so its pixels stay unpainted,
    where colorize would refuse them."""
    labels = np.zeros((1, 3), np.int64)
    assert overlay(np.zeros((1, 3, 3), np.uint8), labels, [(255, 255, 255)], alpha=0.5).tolist() == [[[128] * 3] * 3]
    assert overlay(np.full((1, 3, 3), 10, np.uint8), labels, [(255, 0, 10)], alpha=0.25).tolist() == [
        [[71, 8, 10]] * 3
    ]
    assert overlay(np.full((1, 3, 3), 3, np.uint8), labels, [(200, 0, 3)], alpha=0.75).tolist() == [[[151, 1, 3]] * 3]
    palette = default_palette(255)
    image = np.full((1, 3, 3), 7, np.uint8)
    truth = np.array([[0, 255, 254]], np.uint8)
    painted = overlay(image, truth, palette, alpha=1.0)
    assert painted[0, 1].tolist() == [7, 7, 7]
    assert tuple(painted[0, 0]) == palette[0] and tuple(painted[0, 2]) == palette[254]


def _resize_cases(seed: int, count: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(source, target) sizes: random ones up and down, and the special ones (same width or height, exactly half,
    exactly double, one pixel)."""
    rng = np.random.default_rng(seed)
    cases = [((int(rng.integers(1, 120)), int(rng.integers(1, 120))),
              (int(rng.integers(1, 240)), int(rng.integers(1, 240)))) for _ in range(count)]  # fmt: skip
    return cases + [((64, 90), (64, 45)), ((64, 90), (37, 90)), ((64, 90), (32, 45)), ((33, 17), (66, 34)),
                    ((1, 1), (5, 9)), ((5, 9), (1, 1)), ((3, 200), (1, 7)), ((512, 683), (683, 911))]  # fmt: skip


def test_resize_bilinear_uint8_is_opencv_bit_for_bit():
    """mmcv resizes with cv2.resize(INTER_LINEAR) on uint8 images: the same pixels, exactly, on random sizes."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for (h, w), (th, tw) in _resize_cases(0, 60):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR).reshape(th, tw, 3)
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        out = resize_bilinear_uint8(x, (th, tw))
        assert out.dtype == torch.float32 and out.shape == (1, 3, th, tw)
        assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected.astype(np.float32)), ((h, w), (th, tw))
        assert torch.equal(resize_bilinear_uint8(x.float(), (th, tw)), out)  # integer-valued floats: the same


def test_resize_taps_are_kept_per_size(monkeypatch):
    """The resize's taps are made once per (source, output) size and axis and kept (TAPS_KEPT of them): a second
    batch of a size makes none and gets the same pixels; kept under inference mode, they serve calls outside it (not
    inference tensors); a dispatch mode's call and a CUDA graph's capture neither keep nor take kept ones; the
    oldest are dropped past the bound."""
    from torch.utils.flop_counter import FlopCounterMode

    from denseclip_fast import preprocess

    preprocess._taps_of.cache_clear()
    made = []
    real = preprocess._linear_taps
    monkeypatch.setattr(preprocess, "_linear_taps", lambda *a, **k: made.append(a[:2]) or real(*a, **k))
    x = torch.from_numpy(np.random.default_rng(6).integers(0, 256, size=(1, 3, 37, 53), dtype=np.uint8))
    with torch.inference_mode():
        first = resize_bilinear_uint8(x, (64, 90))
    assert sorted(made) == [(37, 64), (53, 90)]
    again = resize_bilinear_uint8(x, (64, 90), (3, 5, 20, 30))
    assert len(made) == 2 and torch.equal(again, first[:, :, 3:23, 5:35])
    assert not any(t.is_inference() for t in preprocess._kept_taps(37, 64, x.device, clamp_weight=False))
    with FlopCounterMode(display=False):
        resize_bilinear_uint8(x, (64, 90))
    assert len(made) == 4 and preprocess._taps_of.cache_info().currsize == 2
    monkeypatch.setattr(preprocess, "_capturing", lambda device: True)  # a CUDA graph's capture: its own taps
    assert torch.equal(resize_bilinear_uint8(x, (64, 90)), first)
    assert len(made) == 6 and preprocess._taps_of.cache_info().currsize == 2
    monkeypatch.setattr(preprocess, "_capturing", lambda device: False)
    monkeypatch.setattr(preprocess, "_taps_of", functools.lru_cache(maxsize=3)(preprocess._taps_of.__wrapped__))
    for width in (91, 92):
        resize_bilinear_uint8(x, (64, width))
    assert preprocess._taps_of.cache_info().currsize == 3


def test_resize_window_is_the_same_part_of_the_whole_resize():
    """window=(top, left, h, w) computes only that part of the resized image: the pixels of the whole result."""
    rng = np.random.default_rng(4)
    for (h, w), (th, tw) in _resize_cases(5, 30):
        x = torch.from_numpy(rng.integers(0, 256, size=(2, 3, h, w), dtype=np.uint8))
        whole = resize_bilinear_uint8(x, (th, tw))
        top, left = int(rng.integers(0, th)), int(rng.integers(0, tw))
        wh, ww = int(rng.integers(1, th - top + 1)), int(rng.integers(1, tw - left + 1))
        part = resize_bilinear_uint8(x, (th, tw), (top, left, wh, ww))
        assert torch.equal(part, whole[:, :, top : top + wh, left : left + ww]), ((h, w), (th, tw))
    with pytest.raises(ValueError, match=r"window \(top, left, height, width\) must lie inside size \(4, 4\)"):
        resize_bilinear_uint8(x, (4, 4), (2, 0, 3, 1))


def test_resize_nearest_is_opencv_bit_for_bit():
    """mmcv resizes label maps with cv2.resize(INTER_NEAREST) (torch's "nearest" picks other pixels for some size
    pairs, as 255 ignored pixels or wrong classes along the picked rows)."""
    cv2 = pytest.importorskip("cv2")
    import torch.nn.functional as F

    rng = np.random.default_rng(2)
    torch_differs = 0
    for (h, w), (th, tw) in _resize_cases(3, 200):
        label = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        expected = cv2.resize(label, (tw, th), interpolation=cv2.INTER_NEAREST).reshape(th, tw)
        out = resize_nearest(torch.from_numpy(label), (th, tw))
        assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected), ((h, w), (th, tw))
        plain = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(th, tw), mode="nearest")
        torch_differs += not np.array_equal(plain[0, 0].byte().numpy(), expected)
    assert torch_differs > 0  # the cases include pairs where the float32 scale goes wrong


@pytest.mark.parametrize(
    "resize, x, size, match",
    [
        (resize_bilinear_uint8, torch.zeros(3, 4, 4), (2, 2), r"\(B, C, H, W\) image batch, got shape \(3, 4, 4\)"),
        (resize_bilinear_uint8, torch.zeros(1, 3, 4, 4), (0, 2), r"size must be positive \(height, width\), got"),
        (resize_nearest, torch.zeros(4), (2, 2), r"x must have \(H, W\) as its last two dimensions, got shape \(4,\)"),
        (resize_nearest, torch.zeros(4, 4), (3, -1), r"size must be positive \(height, width\), got \(3, -1\)"),
    ],
)  # fmt: skip
def test_resize_errors(resize, x, size, match):
    with pytest.raises(ValueError, match=match):
        resize(x, size)


def test_resize_rounds_and_clips_other_dtypes_first():
    """Non-uint8 input is rounded and clipped to 0..255 first, whether or not the size changes."""
    x = torch.from_numpy(np.random.default_rng(6).integers(0, 256, size=(1, 3, 9, 14), dtype=np.uint8))
    noisy = x.float() + torch.empty(x.shape).uniform_(-0.45, 0.45)
    assert torch.equal(resize_bilinear_uint8(noisy, (5, 20)), resize_bilinear_uint8(x, (5, 20)))
    assert torch.equal(resize_bilinear_uint8(noisy, (9, 14)), x.float())
    wide = x.int() * 2 - 128  # -128..382
    assert torch.equal(resize_bilinear_uint8(wide, (9, 14)), wide.clamp(0, 255).float())


def test_load_image_equals_opencv_imread(tmp_path):
    """mmcv loads with cv2 (imdecode, IMREAD_COLOR, BGR): the same pixels as load_image, for JPEGs of each chroma
    subsampling and a 16-bit grey PNG."""
    cv2 = pytest.importorskip("cv2")
    from PIL import Image

    rng = np.random.default_rng(7)
    smooth = cv2.GaussianBlur(np.clip(rng.normal(128, 60, (123, 217, 3)), 0, 255).astype(np.uint8), (5, 5), 2)
    for quality, subsampling in ((90, 0), (95, 1), (75, 2)):
        path = tmp_path / f"q{quality}.jpg"
        Image.fromarray(smooth).save(path, quality=quality, subsampling=subsampling)
        expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.array_equal(load_image(path), expected), (quality, subsampling)
    Image.fromarray(rng.integers(0, 65536, size=(20, 30)).astype(np.uint16)).save(tmp_path / "deep.png")
    expected = cv2.cvtColor(cv2.imread(str(tmp_path / "deep.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(load_image(tmp_path / "deep.png"), expected)


def test_normalisation_is_within_an_ulp_of_mmcvs():
    """mmcv's imnormalize subtracts the mean (cv2.subtract, float32) and multiplies by a float64 1 / std
    (cv2.multiply); normalize divides by the float32 std: the same value, or the next float32, for every channel
    value (README says 267 of the 768 differ, with OpenCV 4.14)."""
    cv2 = pytest.importorskip("cv2")
    values = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))[None]  # (1, 256, 3): every value, each channel
    expected = values.astype(np.float32)
    cv2.subtract(expected, np.float64([CLIP_MEAN]), expected)
    cv2.multiply(expected, 1 / np.float64([CLIP_STD]), expected)
    ours = normalize(torch.from_numpy(values).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    ulp = np.spacing(np.abs(expected))
    assert np.all(np.abs(ours - expected) <= ulp)
    assert 0 < int(np.count_nonzero(ours != expected)) < 300  # not bit for bit (else README's note is stale)


def test_the_default_palette_is_its_hues_at_saturation_075_and_alternating_brightness():
    """default_palette's colour i is the HSV colour (i x 0.618... mod 1, 0.75, 0.95 for even i, 0.7 for odd i),
    rounded to 8 bits: read back with colorsys every component is within the rounding (hue to 1%). By hand: colour 0
    is hue 0, so (0.95, 0.95 x 0.25, 0.95 x 0.25) x 255 = (242.25, 60.56, 60.56) -> (242, 61, 61)."""
    import colorsys

    palette = default_palette(64)
    assert palette[0] == (242, 61, 61)
    for i, colour in enumerate(palette):
        hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in colour))
        expected = (i * 0.618033988749895) % 1.0
        assert min(abs(hue - expected), 1 - abs(hue - expected)) < 0.01, (i, colour)
        assert abs(saturation - 0.75) < 0.01 and abs(value - (0.95 if i % 2 == 0 else 0.7)) < 0.003, (i, colour)


@pytest.mark.parametrize(
    "palette, got",
    [([(1, 2, 3, 4), (5, 6, 7, 8)], "[(1, 2, 3, 4), (5, 6, 7, 8)]"),
     ([(-1, 0, 0), (0, 0, 0)], "[(-1, 0, 0), (0, 0, 0)]"),
     ([(1, 2, 3), (4, 5, 6), (7, 8, 9)], "3 colours")],
)  # fmt: skip
def test_a_palette_of_four_channels_negative_values_or_a_colour_too_many_is_refused(palette, got):
    from denseclip_fast.visualize import check_palette

    with pytest.raises(ValueError) as info:
        check_palette(palette, 2)
    assert str(info.value) == ("palette must be None or 2 (r, g, b) triples of integers in 0..255 (one per class), "
                               f"got {got}")  # fmt: skip


def test_colorize_refuses_labels_that_are_not_integers_naming_their_dtype():
    """1.0 is no class index (numpy's own IndexError for float indices names nothing)."""
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float64"):
        colorize(np.array([[1.0, 0.0]]), default_palette(2))


def test_colorize_refuses_negative_labels_and_takes_an_empty_map():
    """-1 would index the palette's last colour; an empty map is an empty picture (no min() of nothing)."""
    palette = default_palette(2)
    with pytest.raises(ValueError, match=re.escape("labels range -1..1 exceeds the palette of 2 colours")):
        colorize(np.array([[-1, 1]]), palette)
    assert colorize(np.zeros((0, 4), np.int64), palette).shape == (0, 4, 3)


def test_colorize_gives_uint8_colours_whatever_the_palettes_integer_type():
    """A palette of Python ints (int64 to numpy) still colours in uint8, an image's type (Image.fromarray takes it)."""
    colours = colorize(np.array([[1, 0]], np.uint8), [(1, 2, 3), (250, 251, 252)])
    assert colours.dtype == np.uint8 and colours.tolist() == [[[250, 251, 252], [1, 2, 3]]]


def test_overlay_refuses_an_alpha_past_1_and_labels_with_a_third_axis():
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match=re.escape("alpha must be a real number in [0, 1], got float 1.5")):
        overlay(image, np.zeros((2, 2), np.int64), default_palette(2), alpha=1.5)
    with pytest.raises(ValueError, match=re.escape("image (2, 2) and labels (2, 2, 1) differ in size")):
        overlay(image, np.zeros((2, 2, 1), np.int64), default_palette(2))
    # the image is what the docstring says: a grey (3, 3) one broadcast its rows across the colours (alpha 0 gave
    # [[0, 60, 120]] * 3 back, not the image), an RGBA one got numpy's broadcast error, a 0..1 float one was black
    grey = np.arange(9, dtype=np.uint8).reshape(3, 3) * 20
    for bad, shown in ((grey, "uint8 (3, 3)"), (np.zeros((3, 3, 4), np.uint8), "uint8 (3, 3, 4)"),
                       (np.full((3, 3, 3), 0.5, np.float32), "float32 (3, 3, 3)")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"image must be a uint8 (H, W, 3) RGB array, got {shown}")):
            overlay(bad, np.zeros((3, 3), np.int64), [(0, 0, 0)], alpha=0.0)
    rgb = np.stack([grey, grey + 1, grey + 2], axis=-1)
    assert np.array_equal(overlay(rgb, np.zeros((3, 3), np.int64), [(0, 0, 0)], alpha=0.0), rgb)


def test_an_ignored_pixel_beside_a_one_class_palette_is_left_unpainted():
    """The ignored pixels are coloured as class 0 (a class every palette has) and then given their image back."""
    image = np.full((1, 2, 3), 7, np.uint8)
    painted = overlay(image, np.array([[0, 255]], np.uint8), [(10, 20, 30)], alpha=1.0)
    assert painted.tolist() == [[[10, 20, 30], [7, 7, 7]]]
