"""Segmentation data: the ADE20K and the generic directory layouts, the official training augmentation, and a
resumable, distributed sampler.

Layouts (images in any format segment reads, preprocess.IMAGE_EXTENSIONS):
  ade20k   DIR/images/{training,validation}/*.jpg, DIR/annotations/{training,validation}/*.png; label 0 is
           "other" and ignored, classes shift down by one (mmseg's ``reduce_zero_label``); the 150 ADE20K classes.
  generic  DIR/images/NAME.jpg, DIR/labels/NAME.png (class indices, 255 ignored), DIR/classes.txt (one name a
           line), optional DIR/splits/train.txt and DIR/splits/val.txt listing NAMEs, both or neither (without
           splits/ every image serves both; a splits/ without one of them is refused: that split would be every
           image, the other's included). With 256 classes or more, 255 is a class: the labels are 16-bit PNGs and
           the ignored value is another one, ``ignore_index`` (e.g. 65535), which must lie outside 0..classes-1.
Training augmentation, as the official pipeline: keep-ratio resize to (2048, 512) x a ratio in [0.5, 2.0] (image
bilinear, label nearest, both bit-exact with mmcv's OpenCV), random crop whose most frequent class covers < 75% (10
tries), horizontal flip (p 0.5), photometric distortion (brightness, contrast, saturation, hue, mmseg's order and
ranges), CLIP normalisation, pad to the crop (image 0 after normalisation, label ``ignore_index``, 255). Each
sample's randomness is seeded by (seed, its position in the sample stream), so a run is reproducible whatever the
worker count, and a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..class_names import ADE20K_CLASSES
from ..preprocess import (
    IMAGE_EXTENSIONS,
    TRANSPOSING_ORIENTATIONS,
    exif_orientation,
    image_size,
    keep_ratio_size,
    load_image,
    normalize,
    refuse_broken_link,
    resize_bilinear_uint8,
    resize_nearest,
    too_large,
)
from ..validation import IGNORE, check_ignore_index

if TYPE_CHECKING:
    from .config import TrainConfig


def not_a_directory(path: str) -> str:
    """What is wrong with ``path``, which is not a directory: "does not exist", or, when it exists (a file), "is not
    a directory" (saying "does not exist" of a file sent users looking for a path that was there)."""
    return "is not a directory" if os.path.exists(path) else "does not exist"


@dataclass(frozen=True)
class Sample:
    image: str
    label: str


def _names_in(folder: str, suffixes: Sequence[str]) -> dict[str, str]:
    """NAME -> path of the files in ``folder`` with one of ``suffixes`` (any case), hidden ones (a name starting with
    a dot: macOS's ._NAME.png resource forks) and folders (a folder named x.png) left out; two files of one NAME
    (a.jpg and a.png, a.png and a.PNG) are refused: which one a sample takes would be a guess, and so is a broken
    symbolic link of such a name, here rather than when a DataLoader worker opens it, hours into a run."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} {not_a_directory(folder)} (the layouts: README.md, Training, Data)")
    paths: dict[str, str] = {}
    with os.scandir(folder) as entries:  # the kind of each entry comes with the listing: a stat for links only
        listed = sorted((e.name, e.is_file()) for e in entries if not e.is_dir() and (e.is_file() or e.is_symlink()))
    for file, reachable in listed:
        if file.lower().endswith(tuple(suffixes)) and not file.startswith("."):
            if not reachable:  # a link to nothing: no lookup of the files that are there
                refuse_broken_link(os.path.join(folder, file))
            name, path = os.path.splitext(file)[0], os.path.join(folder, file)
            if name in paths:
                raise ValueError(f"{paths[name]} and {path} have the same NAME {name!r}: keep one file per name "
                                 "(remove or rename the other)")  # fmt: skip
            paths[name] = path
    return paths


def _accepted(folder: str, suffixes: Sequence[str]) -> str:
    """For an error message: the files ``folder`` may hold and, if it holds others, how many were skipped, files of
    other extensions and subfolders apart (images/train/ was called a file of another extension)."""
    kinds = " or ".join([", ".join(suffixes[:-1]), suffixes[-1]] if len(suffixes) > 1 else suffixes)
    entries = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    folders = [f for f in entries if os.path.isdir(os.path.join(folder, f))]
    others = [f for f in entries if not f.lower().endswith(tuple(suffixes)) and f not in folders]
    skipped = f"; {len(others)} file(s) of other extensions skipped, e.g. {others[0]}" if others else ""
    if folders:
        skipped += f"; {len(folders)} subfolder(s) skipped, e.g. {folders[0]}: subfolders are not searched"
    return f"{kinds} files, any letter case{skipped}"


def _text_lines(path: str, blank_inside: bool = True) -> list[str]:
    """The non-blank lines of a UTF-8 text file (classes.txt, a split file), stripped; a BOM (Windows' Notepad) is
    not a character. ValueError naming the file when it is not UTF-8 text, or, without ``blank_inside``, when a
    blank line comes before the last non-blank one (classes.txt: a line's position is its class index)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    while lines and not lines[-1]:
        lines.pop()
    if not blank_inside and "" in lines:
        raise ValueError(f"{path} line {lines.index('') + 1} is blank: a class's index is its line's position (0 "
                         "for the first), so the classes after it would be counted one off; remove it, or name the "
                         "class of that index")  # fmt: skip
    return [line for line in lines if line]


def find_samples(root: str, layout: str, split: str) -> tuple[list[Sample], list[str]]:
    """The (image, label) pairs of ``split`` ("train" or "val") and the class names."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(root):  # eval --data FILE said "FILE/images does not exist"
        raise ValueError(f"data directory {root!r} {not_a_directory(root)}")
    if layout == "ade20k":
        sub = "training" if split == "train" else "validation"
        image_dir, label_dir = os.path.join(root, "images", sub), os.path.join(root, "annotations", sub)
        _check_layout(root, layout, [image_dir, label_dir])
        images, labels = _names_in(image_dir, IMAGE_EXTENSIONS), _names_in(label_dir, (".png",))
        names = list(images)
        classes = list(ADE20K_CLASSES)
    elif layout == "generic":
        image_dir, label_dir = os.path.join(root, "images"), os.path.join(root, "labels")
        classes_file = os.path.join(root, "classes.txt")
        _check_layout(root, layout, [image_dir, label_dir, classes_file])
        images, labels = _names_in(image_dir, IMAGE_EXTENSIONS), _names_in(label_dir, (".png",))
        if not os.path.isfile(classes_file):
            raise ValueError(f"{classes_file} is missing (one class name a line)")
        classes = _text_lines(classes_file, blank_inside=False)
        if not classes:
            raise ValueError(f"{classes_file} lists no class names")
        splits = os.path.join(root, "splits")
        held = _split_files(root)
        lacking = [f for f in ("train.txt", "val.txt") if f not in held]
        if held and lacking:  # the missing split would be every image: validation images trained on, silently
            raise ValueError(
                f"{' and '.join(os.path.join(splits, f) for f in lacking)} {'is' if len(lacking) == 1 else 'are'} "
                f"missing ({splits} holds {', '.join(held)}): give both split files, train.txt and val.txt, or "
                "neither (without splits/ every image serves both)"
            )
        split_file = os.path.join(splits, f"{split}.txt")
        if held:
            names = _text_lines(split_file)
            if not names:
                raise ValueError(f"{split_file} lists no names (one image NAME a line)")
            repeated = sorted(n for n, count in Counter(names).items() if count > 1) if split == "val" else []
            if repeated:  # an evaluation would count each twice (a train split may repeat a name to oversample it)
                raise ValueError(f"{split_file} lists {len(repeated)} name(s) more than once, e.g. {repeated[0]!r}: "
                                 "an evaluation would count each of them as often; list every image once")  # fmt: skip
            missing = [n for n in names if n not in images]
            if missing:
                stem, suffix = os.path.splitext(missing[0])
                if suffix.lower() in IMAGE_EXTENSIONS and stem in images:  # s0.jpg for the image s0.jpg
                    raise ValueError(f"{split_file} lists {len(missing)} name(s) without an image, e.g. "
                                     f"{missing[0]!r}: a split file lists image NAMEs without their extension "
                                     f"({stem!r}, not {missing[0]!r})")  # fmt: skip
                raise ValueError(f"{split_file} lists {len(missing)} name(s) without an image, e.g. {missing[0]!r} "
                                 f"(images in {image_dir} are {_accepted(image_dir, IMAGE_EXTENSIONS)})")  # fmt: skip
        else:
            names = list(images)
    else:
        raise ValueError(f"layout must be 'ade20k' or 'generic', got {layout!r}")
    unlabeled = [n for n in names if n not in labels]
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} image(s) in {root} have no label file, e.g. {images[unlabeled[0]]} "
                         f"(labels in {label_dir} are NAME{_accepted(label_dir, ('.png',))})")  # fmt: skip
    if not names:
        raise ValueError(f"no {split} images found in {image_dir} ({layout} layout: images are "
                         f"{_accepted(image_dir, IMAGE_EXTENSIONS)})")  # fmt: skip
    return [Sample(images[n], labels[n]) for n in names], classes


def _looks_like(root: str, layout: str) -> bool:
    """Whether ``root`` has the marks of ``layout``: ADE20K's images/training or images/validation folder beside
    annotations/; the generic layout's classes.txt, or image files right in images/ beside labels/."""
    if layout == "ade20k":
        return os.path.isdir(os.path.join(root, "annotations")) and any(
            os.path.isdir(os.path.join(root, "images", sub)) for sub in ("training", "validation")
        )
    images = os.path.join(root, "images")
    if os.path.isfile(os.path.join(root, "classes.txt")):
        return True
    return (os.path.isdir(os.path.join(root, "labels")) and os.path.isdir(images)
            and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(images)))  # fmt: skip


LAYOUT_SHAPES = {  # for the messages
    "ade20k": "DIR/images/training, DIR/annotations/training",
    "generic": "DIR/images, DIR/labels, DIR/classes.txt",
}


def _check_layout(root: str, layout: str, paths: Sequence[str]) -> None:
    """ValueError saying which layout ``root`` looks like when one of ``layout``'s ``paths`` is missing and the
    folder has the other layout's marks (train's default is ade20k: a generic folder was told that
    images/training does not exist); nothing otherwise (the caller's own checks name what is missing)."""
    missing = next((p for p in paths if not os.path.exists(p)), None)
    other = "generic" if layout == "ade20k" else "ade20k"
    if missing is not None and _looks_like(root, other):
        default = "train's default is ade20k; " if layout == "ade20k" else ""
        raise ValueError(f"{missing} does not exist ({layout} layout), but {root} looks like the {other} layout "
                         f"({LAYOUT_SHAPES[other]}): pass --layout {other} ({default}layout: {other} in a "
                         "config)")  # fmt: skip


def _split_files(root: str) -> list[str]:
    """The files in a generic layout's ``root/splits`` (none without the folder; hidden files, a .gitkeep, not
    counted): without any, every image serves both splits."""
    splits = os.path.join(root, "splits")
    return sorted(f for f in os.listdir(splits) if not f.startswith(".")) if os.path.isdir(splits) else []


def class_list_source(root: str, layout: str, count: int) -> str:
    """Where a data set's ``count`` class names come from, as messages about them say it."""
    if layout == "ade20k":
        return f"--layout ade20k's class list (the {count} ADE20K classes)"
    return f"the data set's class list {os.path.join(root, 'classes.txt')}"


def shared_split_note(root: str, layout: str) -> str | None:
    """What a training run on ``root`` should say when its evaluation is its training images: a generic layout
    without split files (every image serves both splits, as documented); None otherwise."""
    if layout != "generic" or _split_files(root):
        return None
    splits = os.path.join(root, "splits")
    # "splits holds no split files" of a folder that is not there sent users looking for it
    where = f"{splits} holds no split files" if os.path.isdir(splits) else f"{root} has no splits/ folder"
    return (f"{where}, so every image serves both training and evaluation: the mIoU measures the fit to the "
            "training images, not to unseen ones (list the names of each split in splits/train.txt and "
            "splits/val.txt to hold images out)")  # fmt: skip


def _label_size_error(
    sample: Sample, label_size: Sequence[int], image_size: Sequence[int], orientation: int | None = None
) -> ValueError:
    """The error for a label whose size differs from its image's, as :func:`load_image` returns the image: turned
    upright by its EXIF orientation (as mmcv's loader; read here unless given), while the label is read as stored
    (as mmseg's)."""
    message = f"{sample.label}: label size {tuple(label_size)} differs from its image's {tuple(image_size)}"
    if orientation is None:
        orientation = exif_orientation(sample.image)
    if orientation in TRANSPOSING_ORIENTATIONS:
        stored = tuple(image_size)[::-1]
        message += (f", which its EXIF orientation ({orientation}) turns from the stored {stored}; the label is read "
                    "as stored, as mmseg does (store the image upright, or turn the label likewise)")  # fmt: skip
    return ValueError(message)


def read_label(path: str, num_classes: int, reduce_zero_label: bool, ignore_index: int = IGNORE) -> np.ndarray:
    """(H, W) int64 class indices, ``ignore_index`` for ignored pixels. ValueError naming the file for an
    unreadable file or a class index out of range. ``reduce_zero_label`` as mmseg's: 0 and ``ignore_index`` are
    ignored, every other value k becomes class k - 1."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            label = np.asarray(img).astype(np.int64)
    except Image.DecompressionBombError as exc:
        raise too_large(path, exc) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # SyntaxError: Pillow's for a malformed block
        raise ValueError(f"{path}: not a readable label image ({exc})") from None
    if label.ndim != 2:
        raise ValueError(f"{path}: a label must be a single-channel image of class indices, got shape {label.shape}")
    ignored = label == ignore_index
    skipped = str(ignore_index)  # the values ignored, for the message
    if reduce_zero_label:  # mmseg's: 0 -> 255, minus 1, 254 -> 255
        # 0 is ignored and k becomes class k - 1; the ignore value stays ignored unless it is a class's value
        # (ignore_index <= num_classes: value ignore_index is class ignore_index - 1)
        keeps_ignore = ignore_index > num_classes
        ignored = (label == 0) | (ignored & keeps_ignore)
        skipped = f"0 and {ignore_index}" if keeps_ignore else "0"
        label = label - 1
    bad = ~ignored & ((label < 0) | (label >= num_classes))
    if bad.any():
        value = int(label[bad][0]) + (1 if reduce_zero_label else 0)
        valid = f"1..{num_classes}" if reduce_zero_label else f"0..{num_classes - 1}"
        raise ValueError(
            f"{path}: label value {value} is out of range for {num_classes} classes (valid: {valid}, and {skipped} "
            "for ignored pixels)"
        )
    label[ignored] = ignore_index
    return label


# ------------------------------------------------------------------------------------------------ augmentation


# OpenCV's 8-bit RGB -> HSV (RGB2HSV_b): fixed-point reciprocals with 12 fractional bits, rounded half up
_HSV_SHIFT = 12
_RECIPROCAL_OF = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    _SAT_DIV = np.where(_RECIPROCAL_OF > 0, np.rint((255 << _HSV_SHIFT) / _RECIPROCAL_OF), 0).astype(np.int32)
    _HUE_DIV = np.where(_RECIPROCAL_OF > 0, np.rint((180 << _HSV_SHIFT) / (6 * _RECIPROCAL_OF)), 0).astype(np.int32)
# For each hue sector 0..5 of OpenCV's HSV -> RGB: which of its table (v, v (1 - s), v (1 - s f), v (1 - s (1 - f)))
# B, G and R take
_SECTOR_TAB = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]], dtype=np.int64)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's PhotoMetricDistortion.convert: x * alpha + beta, clipped to 0..255 and truncated to uint8 values."""
    return np.floor(np.clip(x.astype(np.float32) * alpha + beta, 0, 255))


def _to_hsv8(rgb: np.ndarray) -> np.ndarray:
    """uint8-valued RGB (float array) -> 8-bit HSV as cv2.cvtColor computes it (H 0..179, S and V 0..255): OpenCV's
    integer algorithm, equal to opencv-python 4.5.5 (the official code's era) and 4.14 on all 2^24 colours."""
    x = rgb.astype(np.int32)  # products below 2^31: diff * sdiv <= 255 x 1044480, |h| * hdiv <= 1275 x 122880
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SAT_DIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HUE_DIV[diff] + half) >> _HSV_SHIFT  # an arithmetic shift: floor for negative h, as OpenCV's
    h += np.where(h < 0, 180, 0)
    return np.stack([h, s, v], axis=-1).astype(np.float64)


def _from_hsv8(hsv: np.ndarray) -> np.ndarray:
    """8-bit HSV (H 0..179) -> RGB as cv2.cvtColor's vector code computes it: float32 with v = V / 255, s = S / 255,
    the sector and fraction of H * 6/180, the sector's table entries (1 - s f rounded once: a fused multiply-add) and
    x * 255 truncated. Equal to opencv-python 4.5.5 and 4.14 on all 180 x 256 x 256 values in the pixels the vector
    code takes; OpenCV's scalar code, which takes the rest of each row (width mod a CPU-dependent block of 16 to 64
    pixels: all of a row narrower than that), rounds to nearest instead (one level on about 3 in 4 of those)."""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.floor(h)
    frac = h - sector
    s64 = s.astype(np.float64)  # a float32 product is exact in float64: 1 - s f rounded once, as a fused multiply-add
    table = np.stack([v, v * (f32(1.0) - s), v * (1.0 - s64 * frac).astype(f32),
                      v * (1.0 - s64 * (f32(1.0) - frac)).astype(f32)]).reshape(4, -1)  # fmt: skip
    table *= f32(255.0)
    np.floor(table, out=table)
    np.clip(table, 0, 255, out=table)
    n = table.shape[1]
    picks = _SECTOR_TAB[sector.astype(np.int64).reshape(-1) % 6] * n + np.arange(n)[:, None]  # (n, 3) flat indices
    out = np.empty(hsv.shape, np.float64)
    for channel in range(3):  # R, G, B: OpenCV's B, G, R reversed
        out[..., channel] = np.take(table, picks[:, 2 - channel]).reshape(hsv.shape[:-1])
    return out


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8-valued RGB image (float array), with its uint8 quantisation after
    every step: brightness +-32, contrast x[0.5, 1.5] (before or after the colour changes), saturation x[0.5, 1.5],
    hue + [-18, 17] (of 180, numpy's exclusive upper bound); each applied with probability 0.5, draws in mmseg's
    order. (mmseg works on BGR; the HSV of BGR data equals the HSV of the same pixels in RGB.)"""
    img = image.astype(np.float64)
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    if contrast_first:
        img = contrast(img)
    if rng.integers(2):
        hsv = _to_hsv8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = _from_hsv8(hsv)
    if rng.integers(2):
        hsv = _to_hsv8(img)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18)) % 180
        img = _from_hsv8(hsv)
    if not contrast_first:
        img = contrast(img)
    return img


def random_crop_box(
    label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator, ignore_index: int = IGNORE
) -> tuple[int, int]:
    """Top-left corner of the crop, as mmseg's RandomCrop: a random box; while its most frequent (non-ignored)
    class covers ``cat_max_ratio`` or more (or it holds one class), up to 10 times, a new box (the last one is not
    checked)."""
    h, w = label.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            window = label[top : top + crop, left : left + crop]
            counts = np.bincount(window[window != ignore_index])
            counts = counts[counts > 0]  # the pixels of each class present (labels are 0..K-1)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop: int,
    img_scale: Sequence[int],
    ratio_range: tuple[float, float],
    cat_max_ratio: float,
    ignore_index: int = IGNORE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) image and (H, W) label -> normalised (3, crop, crop) float32 and (crop, crop) int64 (the
    padding ``ignore_index``)."""
    ratio = rng.uniform(*ratio_range)
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    size = keep_ratio_size(image.shape[0], image.shape[1], scale)
    lab = resize_nearest(torch.from_numpy(label), size).numpy()
    top, left = random_crop_box(lab, crop, cat_max_ratio, rng, ignore_index)
    lab = lab[top : top + crop, left : left + crop]
    window = (top, left, lab.shape[0], lab.shape[1])  # only the crop of the resized image is computed
    resized = resize_bilinear_uint8(torch.from_numpy(image).permute(2, 0, 1)[None], size, window)
    img = resized[0].permute(1, 2, 0).numpy()
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = photometric_distortion(img, rng)
    x = normalize(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float())[0]
    out = torch.zeros(3, crop, crop)
    out_label = torch.full((crop, crop), ignore_index, dtype=torch.long)
    out[:, : x.shape[1], : x.shape[2]] = x
    out_label[: lab.shape[0], : lab.shape[1]] = torch.from_numpy(np.ascontiguousarray(lab))
    return out, out_label


# ------------------------------------------------------------------------------------------------ datasets


class SegmentationData(Dataset):
    """Samples of one split. Training items are ``(index, position)`` pairs from :class:`TrainSampler` (the
    position seeds the augmentation); evaluation items are plain indices -> (uint8 image, label, image path).
    ``ignore_index`` (default: the config's, else 255) marks ignored pixels in the labels it returns."""

    def __init__(
        self, root: str, layout: str, split: str, config: TrainConfig | None = None, ignore_index: int | None = None
    ) -> None:
        self.samples, self.class_names = find_samples(root, layout, split)
        self.reduce_zero_label = layout == "ade20k"
        if config is not None and (config.crop is None or config.img_scale is None):
            config = dataclasses.replace(config)  # a copy with the architecture's crop and image scale
            config.apply_arch_defaults()
        self.config = config
        if ignore_index is None:
            ignore_index = getattr(config, "ignore_index", IGNORE)
        ignore_index = check_ignore_index(ignore_index)
        if 0 <= ignore_index < len(self.class_names):
            raise ValueError(
                f"ignore_index {ignore_index} is a class index: the data set has {len(self.class_names)} classes "
                f"(0..{len(self.class_names) - 1}); with 256 classes or more, store 16-bit label PNGs and mark "
                "ignored pixels with a value >= the class count, e.g. ignore_index 65535"
            )
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = load_image(sample.image)
        label = read_label(sample.label, len(self.class_names), self.reduce_zero_label, self.ignore_index)
        if label.shape != image.shape[:2]:
            raise _label_size_error(sample, label.shape, image.shape[:2])
        return image, label

    def check_label_sizes(self, indices: Iterable[int] | None = None) -> None:
        """The reader's ValueError for the first sample (of ``indices``, default all) whose label's size differs
        from its image's, from the files' headers (no pixels decoded): before a run, rather than when the sample is
        first read, which for the evaluation may be after the whole training. Label values are left to the reader
        (scanning ADE20K's 20k labels up front would take about a minute; the headers take a second)."""
        for i in range(len(self)) if indices is None else indices:
            sample = self.samples[i]
            label_size = image_size(sample.label)
            if label_size != image_size(sample.image, upright=True):
                # the exact size load_image returns: an EXIF orientation after a PNG's pixels is not in its header
                size, orientation = image_size(sample.image), exif_orientation(sample.image)
                if orientation in TRANSPOSING_ORIENTATIONS:
                    size = size[::-1]
                if label_size != size:
                    raise _label_size_error(sample, label_size, size, orientation)
            self._check_training_size(sample, label_size)

    def _check_training_size(self, sample: Sample, size: tuple[int, int]) -> None:
        """A training image that the keep-ratio resize at the low end of ratio_range leaves without a pixel on a side
        (a 1 x 2100 strip) failed in a DataLoader worker, at whatever iteration drew that ratio, without its name."""
        cfg = self.config
        if cfg is None or cfg.img_scale is None:
            return
        low = cfg.ratio_range[0]
        scale = (int(cfg.img_scale[0] * low), int(cfg.img_scale[1] * low))
        resized = keep_ratio_size(size[0], size[1], scale)
        if min(resized) < 1:
            raise ValueError(f"{sample.image}: a {size[0]}x{size[1]} image, resized for training at the low end of "
                             f"ratio_range ({low} x img_scale {tuple(cfg.img_scale)}), is {resized[0]}x{resized[1]} "
                             "pixels, a side of none: crop or drop it, or raise ratio_range's low end")  # fmt: skip

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, tuple):
            index, position = item
            cfg = self.config
            assert cfg is not None, "training items need the TrainConfig"
            image, label = self.read(index)
            assert cfg.crop is not None and cfg.img_scale is not None  # filled in __init__
            rng = np.random.default_rng([cfg.seed, position])
            return train_transform(image, label, rng, cfg.crop, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio,
                                   self.ignore_index)  # fmt: skip
        image, label = self.read(item)
        return image, label, self.samples[item].image


class TrainSampler(Sampler):
    """An endless stream of ``(index, position)``: epoch e is a permutation seeded by (seed, e), padded to a
    multiple of ``world`` and dealt round-robin to the ranks; ``position`` numbers the stream. ``start`` skips the
    first samples of this rank's stream (resume)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = -(-self.size // self.world)
        epoch, skip = divmod(self.start, per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            order = (order * -(-per_rank * self.world // self.size))[: per_rank * self.world]  # padded by repeating
            mine = order[self.rank :: self.world]
            for i in range(skip, per_rank):
                yield mine[i], ((epoch * per_rank + i) * self.world + self.rank)
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # an endless sampler; DataLoader only asks for it with a length-based batch sampler
        return 2**62
