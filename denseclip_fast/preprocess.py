"""The official test-time preprocessing, in plain torch: load, keep-ratio resize, CLIP normalisation.

mmseg's test pipeline for DenseCLIP: ``Resize(img_scale=(2048, 512), keep_ratio=True)`` (640 for ViT-B/16), then
``Normalize`` with CLIP's mean/std on 0..255 RGB. mmcv resizes uint8 images with OpenCV (``cv2.resize``, bilinear
for images, nearest for label maps). :func:`resize_bilinear_uint8` and :func:`resize_nearest` compute what OpenCV
computes, bit for bit, with torch operations on any device: OpenCV's sampling positions (in float32 from a
float64 scale), its 11-bit fixed-point weights and its integer rounding of the two passes (tested against
opencv-python 4.5.5, 4.14 and 5.0 on random sizes, up and down).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


def pil_to_rgb(img: Any, where: str, int32_is_16_bit: bool = False) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB: Pillow's conversion, except a 16-bit grey image ("I;16", "I;16L",
    "I;16B", "I;16N": any byte order), reduced to its high byte as OpenCV (mmcv's loader) reduces 16-bit images
    (Pillow alone would clip it to 255), and so is a 32-bit integer one ("I") with ``int32_is_16_bit`` (what older
    Pillows open a 16-bit PNG as; an "I" image made in memory, e.g. from an int32 array of 0..255, keeps Pillow's
    conversion). A floating-point image ("F") has no defined 0-255 range and is refused (Pillow would truncate it to
    mostly black)."""
    if img.mode == "F":
        raise ValueError(f"{where}: a floating-point image (PIL mode F) has no defined 0-255 range; convert it to "
                         "8-bit RGB first")  # fmt: skip
    try:  # decoding happens here for a lazily opened image: a truncated file, a closed image, a mode without RGB
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (img.mode == "I" and int32_is_16_bit):
            grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        return np.asarray(img.convert("RGB")).copy()
    except (OSError, ValueError, SyntaxError) as exc:  # SyntaxError: Pillow's for a malformed block
        raise ValueError(f"{where}: the PIL image (mode {img.mode}) cannot be read as RGB: {exc}") from None


def too_large(path: str, exc: Exception) -> ValueError:
    """Pillow's DecompressionBombError (an image past twice PIL.Image.MAX_IMAGE_PIXELS: a small file that would
    decode to gigabytes) as a ValueError naming the file and how to lift the guard, which is kept."""
    return ValueError(f"{path}: {exc} If you trust it, downscale it, or from Python raise PIL.Image.MAX_IMAGE_PIXELS "
                      "(None: no limit) before reading it")  # fmt: skip


def _missing(path: str, what: str) -> ValueError:
    """The error for a ``path`` that names nothing; a file named with a trailing '/' (which the system reads as a
    directory that is not there) is told so."""
    bare = path.rstrip("/" + os.sep)
    if bare and bare != path and os.path.isfile(bare):
        return ValueError(f"{path}: a file named as a directory (a trailing '/'); pass {bare}")
    return ValueError(f"{path or repr(path)}: {what}")  # '': no such image file, not ": no such image file"


@contextlib.contextmanager
def _opened_image(path: str) -> Iterator[Any]:
    """The PIL image at ``path``, open while the block runs; ValueError naming the file when it is missing, not a
    regular file (a directory, or a FIFO whose reading could block forever), or not readable (also while the block
    decodes it)."""
    from PIL import Image, UnidentifiedImageError

    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file (a directory, a FIFO, a socket or a device)")
    try:
        with Image.open(path) as img:
            yield img
    except (FileNotFoundError, NotADirectoryError):
        raise _missing(path, "no such image file") from None
    except Image.DecompressionBombError as exc:
        raise too_large(path, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # SyntaxError: Pillow's for a malformed block
        raise ValueError(f"{path}: not a readable image ({exc})") from None


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, as mmcv's default loader (OpenCV's imdecode) reads it: turned upright
    by its EXIF orientation, and a 16-bit grey image reduced to its high byte (pil_to_rgb). Raises ValueError naming
    the file when it is not a readable 8- or 16-bit image (or not a regular file: reading a FIFO could block
    forever)."""
    from PIL import ImageOps

    from .checkpoints.io import path_argument

    path = path_argument(path)
    with _opened_image(path) as img:
        return pil_to_rgb(ImageOps.exif_transpose(img), path, int32_is_16_bit=True)


# EXIF orientations that swap an image's height and width (transpose, quarter turns, transverse)
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(img: Any, header_only: bool) -> int:
    from PIL import ExifTags, Image

    if header_only or img.format == "TIFF":  # Pillow turns a TIFF as it loads it, and drops its tag then
        exif = Image.Image.getexif(img)  # the base class's: a PNG's own getexif decodes the pixels first
    else:
        img.load()  # as ImageOps.exif_transpose: a PNG's eXIf chunk may follow its pixels
        exif = img.getexif()
    value = exif.get(ExifTags.Base.Orientation, 1)
    return int(value) if value in range(1, 9) else 1  # exif_transpose leaves the image as stored for others


def exif_orientation(path: str | os.PathLike[str], header_only: bool = False) -> int:
    """The EXIF orientation (1..8, 1: as stored) by which :func:`load_image` turns an image file. ``header_only``:
    from what the file holds before its pixels, without decoding them (a PNG's eXIf chunk after its pixels, rare,
    is then not seen). Raises ValueError naming the file when it is not a readable image."""
    path = os.fspath(path)
    with _opened_image(path) as img:
        return _orientation(img, header_only)


def image_size(path: str | os.PathLike[str], upright: bool = False) -> tuple[int, int]:
    """(H, W) of an image file from its header only, without decoding the pixels: as stored, before its EXIF
    orientation (the test-size checks give the same answer either way round), or with ``upright`` as
    :func:`load_image` returns it, the sides swapped by an orientation in the header (``exif_orientation(path,
    header_only=True)``). Raises ValueError naming the file when it is not a readable image."""
    path = os.fspath(path)
    with _opened_image(path) as img:
        width, height = img.size
        transposing = _orientation(img, header_only=True) in TRANSPOSING_ORIENTATIONS
        # Pillow gives a TIFF's size upright already (it turns the pixels as it loads them), other formats' as stored
        turned = transposing and (upright != (img.format == "TIFF"))
    return (width, height) if turned else (height, width)


IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def image_files(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The image files that ``paths`` name, in order: a file as it is, a directory as its regular files with an
    image extension (IMAGE_EXTENSIONS, any case; not recursive; hidden ones, such as macOS's ._NAME.jpg resource
    forks, left out), sorted by name. A single str or PathLike is one path (``image_files("photos")`` is
    ``image_files(["photos"])``, not a path per character). Raises ValueError
    naming a path that does not exist, that is neither a regular file nor a directory (a FIFO or a device, which
    reading could block on forever), a broken symbolic link (given, or in a directory with an image extension: an
    image that would be silently left out), or a directory without images."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    bad = [paths] if isinstance(paths, bytes) else [p for p in paths if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise ValueError(f"paths must be a path (str or os.PathLike) or a sequence of them, as load_image takes, got "
                         f"{type(bad[0]).__name__} {bad[0]!r}")  # fmt: skip
    files: list[str] = []
    for path in (os.fspath(p) for p in paths):
        if os.path.isdir(path):
            named = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))  # fmt: skip
            found = []
            for entry in named:
                if os.path.isfile(entry):
                    found.append(entry)
                else:  # only what is not a readable file can be a broken link: one lookup per image, not three
                    refuse_broken_link(entry)
            if not found:
                raise ValueError(f"{path}: a directory without image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        elif os.path.exists(path):
            raise ValueError(f"{path}: not a regular file or a directory (a FIFO, a socket or a device)")
        else:
            refuse_broken_link(path)
            raise _missing(path, "no such image file or directory")
    return files


def refuse_broken_link(path: str) -> None:
    """ValueError naming ``path`` when it is a symbolic link whose target cannot be reached: an image meant to be there
    (a folder's other entries that are not regular files, FIFOs or folders, are no images and are skipped)."""
    if os.path.islink(path) and not os.path.exists(path):
        target = os.readlink(path)
        raise ValueError(f"{path}: a symbolic link whose target cannot be reached ({target}: missing, a loop, or in "
                         "a folder without search permission); restore its target or remove it")  # fmt: skip


def _scale_sides(scale: Any) -> tuple[int, int]:
    """``scale`` as (long side, short side) after checking it is two ints >= 1 (in either order, as mmseg's
    img_scale); ValueError naming it otherwise (one number was taken for both sides, 512.5 or inf as a size)."""
    sides = tuple(scale) if isinstance(scale, (Sequence, np.ndarray)) and not isinstance(scale, (str, bytes)) else ()
    if len(sides) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1
                                  for s in sides):  # fmt: skip
        raise ValueError(f"scale must be two ints >= 1 (the long and the short side to fit, as mmseg's img_scale "
                         f"(2048, 512)), got {scale!r}")  # fmt: skip
    return int(max(sides)), int(min(sides))


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: the largest size with the image's aspect ratio whose long side fits max(scale)
    and short side fits min(scale). Returns (new_height, new_width)."""
    long_edge, short_edge = _scale_sides(scale)
    if height < 1 or width < 1:
        raise ValueError(f"the image size must be at least 1 x 1, got {height} x {width}")
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 RGB (numpy or torch) -> (1, 3, H, W) float32 in 0..255."""
    t = torch.as_tensor(image)
    if t.dim() != 3 or t.shape[2] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {tuple(t.shape)} dtype {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"image has zero size {tuple(t.shape[:2])}")
    return t.permute(2, 0, 1).unsqueeze(0).float()


_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are integers summing to about 2048


def _source_positions(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """OpenCV's source coordinate of each output pixel, ``(float)((d + 0.5) * scale - 0.5)`` with the float64
    scale ``1 / (dst / src)``, as float32."""
    d = torch.arange(dst, dtype=torch.float64, device=device)
    return ((d + 0.5) * (1.0 / (dst / src)) - 0.5).float()


def _linear_taps(src: int, dst: int, device: torch.device, clamp_weight: bool) -> tuple[torch.Tensor, ...]:
    """(first index, second index, first weight, second weight) per output pixel, as int32 / int64 tensors:
    OpenCV's ``saturate_cast<short>((1 - f) * 2048)`` and ``(f * 2048)``, rounded half to even as cvRound. The
    horizontal pass zeroes the fraction outside the image (``clamp_weight``: the second tap then weighs 0); the
    vertical pass keeps it and clamps only the row indices."""
    pos = _source_positions(src, dst, device)
    first = pos.floor()
    frac = pos - first
    first = first.long()
    if clamp_weight:
        outside = (first < 0) | (first >= src - 1)
        frac = torch.where(outside, torch.zeros_like(frac), frac)
    scale = float(1 << _COEF_BITS)
    w0 = ((1.0 - frac) * scale).round().int()
    w1 = (frac * scale).round().int()
    return first.clamp(0, src - 1), (first + 1).clamp(0, src - 1), w0, w1


# the taps of this many (source size, output size, axis, device, stream) kept (:func:`_kept_taps`)
TAPS_KEPT = 64


def _kept_taps(src: int, dst: int, device: torch.device, clamp_weight: bool) -> tuple[torch.Tensor, ...]:
    """:func:`_linear_taps`, made once per sizes, axis, device and (on a GPU) current stream: about fifteen small
    launches an axis that every uint8 batch of a size repeated (the engine's preprocessing, outside its CUDA graph).
    The same tensors, never written by their users; made outside inference mode (an inference tensor would refuse
    some uses outside it) and on the stream that reads them, so that the caching allocator never hands their memory
    to another stream while its work still reads them (a kept tensor is freed only when TAPS_KEPT newer ones have
    pushed it out). Not kept, nor taken from the kept ones, where the call is traced or recorded (intercepted) or
    captured into a CUDA graph (a capture runs no kernel, so kept taps would hold nothing until a replay, and a graph
    that read kept taps would read freed memory once they were pushed out: the graph's own are its to keep)."""
    from .model.layers import intercepted

    if intercepted() or _capturing(device):  # a tracer's, a dispatch mode's or a CUDA graph's tensors: not kept
        return _linear_taps(src, dst, device, clamp_weight)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return _taps_of(src, dst, device, stream, clamp_weight)


def _capturing(device: torch.device) -> bool:
    """Whether work queued on ``device`` now goes into a CUDA graph being captured."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=TAPS_KEPT)
def _taps_of(src: int, dst: int, device: torch.device, stream: int, clamp_weight: bool) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode(False), torch.no_grad():
        return _linear_taps(src, dst, device, clamp_weight)


def resize_bilinear_uint8(
    x: torch.Tensor, size: Sequence[int], window: tuple[int, int, int, int] | None = None
) -> torch.Tensor:
    """OpenCV's ``cv2.resize(INTER_LINEAR)`` of uint8 images, bit-exact: (B, C, H, W) uint8 values (a uint8 tensor,
    or another dtype, whose values are rounded and clipped to 0..255 first) -> (B, C, *size) float32 holding the
    uint8 result (channels_last in memory when it resizes).
    ``window=(top, left, height, width)``: only that part of the resized image, computed alone (the same pixels as
    slicing the whole result; the training crop).

    A horizontal pass weights two source columns (11-bit weights, int32 sums); a vertical pass combines two of
    those rows as OpenCV's 8-bit ``VResizeLinear`` does: ``((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) +
    2 >> 2``. Any device. The work runs on the (B, H, W, C) layout, in place where it can: the column gathers
    then copy C-pixel runs and the row gathers whole rows (free of a transpose for the permuted view of an
    (H, W, 3) array)."""
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width), got {tuple(size)}")
    top, left, out_h, out_w = window if window is not None else (0, 0, height, width)
    if not (0 <= top and 0 <= left and 1 <= out_h and 1 <= out_w and top + out_h <= height and left + out_w <= width):
        raise ValueError(f"window (top, left, height, width) must lie inside size {(height, width)}, got {window}")
    if x.dtype != torch.uint8:
        x = x.round().clamp(0, 255).to(torch.uint8) if x.is_floating_point() else x.clamp(0, 255).to(torch.uint8)
    if (height, width) == tuple(x.shape[2:]):
        return x[:, :, top : top + out_h, left : left + out_w].float()  # cv2.resize copies an image of the same size
    c0, c1, a0, a1 = (t[left : left + out_w] for t in _kept_taps(x.shape[3], width, x.device, clamp_weight=True))
    r0, r1, b0, b1 = (t[top : top + out_h] for t in _kept_taps(x.shape[2], height, x.device, clamp_weight=False))
    # the source rows a window reads (the taps are monotonic; reading them syncs a GPU, so only for a window)
    first, last = (int(r0[0]), int(r1[-1])) if window is not None else (0, x.shape[2] - 1)
    hwc = x[:, :, first : last + 1].permute(0, 2, 3, 1).contiguous()
    rows = hwc.index_select(2, c0).to(torch.int32).mul_(a0.view(-1, 1))  # (B, rows, out_w, C), up to 255 * 2048
    rows.addcmul_(hwc.index_select(2, c1).to(torch.int32), a1.view(-1, 1)).bitwise_right_shift_(4)
    if first:  # (rows from the window's first source row on)
        r0, r1 = r0 - first, r1 - first
    upper = rows.index_select(1, r0).mul_(b0.view(-1, 1, 1)).bitwise_right_shift_(16)
    lower = rows.index_select(1, r1).mul_(b1.view(-1, 1, 1)).bitwise_right_shift_(16)
    return upper.add_(lower).add_(2).bitwise_right_shift_(2).permute(0, 3, 1, 2).float()


def resize_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """OpenCV's ``cv2.resize(INTER_NEAREST)``, as mmcv resizes label maps: output pixel d takes source pixel
    ``min(floor(d * src / dst), src - 1)`` with the float64 scale ``1 / (dst / src)`` (torch's "nearest" uses a
    float32 scale and picks another pixel for about one size pair in seven). x: (..., H, W), any dtype."""
    if x.dim() < 2:
        raise ValueError(f"x must have (H, W) as its last two dimensions, got shape {tuple(x.shape)}")
    out = x
    for dim, dst in ((-2, int(size[0])), (-1, int(size[1]))):
        src = x.shape[dim]
        if dst < 1:
            raise ValueError(f"size must be positive (height, width), got {tuple(size)}")
        if dst != src:
            d = torch.arange(dst, dtype=torch.float64, device=x.device)
            index = (d * (1.0 / (dst / src))).floor().long().clamp_(max=src - 1)
            out = out.index_select(out.dim() + dim, index)
    return out


def _check_rgb_batch(x: Any, what: str) -> None:
    """ValueError unless ``x`` is a (B, 3, H, W) tensor (an (H, W, 3) image or a 4-channel batch would otherwise be
    taken as channels and broadcast into a wrong result)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, 3, H, W) batch of {what} (to_tensor makes one of (H, W, 3) images), "
                         f"got {got}")  # fmt: skip


def resize_keep_ratio(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """(B, 3, H, W) uint8 values -> float32, resized to :func:`keep_ratio_size` as mmcv's ``imrescale`` (OpenCV
    bilinear, uint8 result)."""
    _check_rgb_batch(x, "RGB values 0..255")
    return resize_bilinear_uint8(x, keep_ratio_size(x.shape[2], x.shape[3], scale))


_GPU_CONSTANTS: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as (1, 3, 1, 1) tensors; on a GPU made once per dtype and device, since building them
    is a blocking host-to-device copy that would stall the engine's stream before every uint8 batch."""
    make = lambda values: torch.tensor(values, dtype=dtype, device=device).view(1, 3, 1, 1)  # noqa: E731
    if device.type != "cuda":
        return make(CLIP_MEAN), make(CLIP_STD)
    key = (dtype, device)
    if key not in _GPU_CONSTANTS:
        _GPU_CONSTANTS[key] = make(CLIP_MEAN), make(CLIP_STD)
    return _GPU_CONSTANTS[key]


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) 0..255 RGB -> CLIP-normalised, in x's floating dtype (float32 for an integer batch: uint8
    arithmetic would truncate CLIP's mean and std and wrap below zero)."""
    _check_rgb_batch(x, "RGB values 0..255")
    mean, std = _mean_std(x.dtype if x.is_floating_point() else torch.float32, x.device)
    # an integer batch minus the float32 mean is float32 (the same values as converting it first, one pass fewer),
    # divided in place: two passes
    return torch.sub(x, mean).div_(std)


def normalize_keep_ratio(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """The test pipeline on a batch: (B, 3, H, W) 0..255 RGB -> :func:`resize_keep_ratio`, then :func:`normalize`;
    a uint8 batch the scale leaves at its size is normalised from its uint8 values (the same values, without the
    float32 copy the resize makes of it)."""
    _check_rgb_batch(x, "RGB values 0..255")
    size = keep_ratio_size(x.shape[2], x.shape[3], scale)
    if x.dtype != torch.uint8 or size != tuple(x.shape[2:]):  # (other values are rounded to uint8 by the resize)
        x = resize_bilinear_uint8(x, size)
    return normalize(x)


def prepare(image: np.ndarray | torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """The whole test pipeline for one uint8 image: (H, W, 3) -> CLIP-normalised (1, 3, h, w)."""
    return normalize_keep_ratio(to_tensor(image), scale)
