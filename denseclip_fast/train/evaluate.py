"""Evaluation: mIoU, per-class IoU, per-class accuracy and aAcc over a split, as mmseg computes them.

Per image the official test pipeline runs (keep-ratio resize to fit ``test_scale`` x each scale ratio, CLIP
normalisation, whole or sliding-window inference, optional horizontal flip); the softmax probabilities of all
scales/flips are averaged at the image's size and the argmax is compared with the label (ignored pixels excluded).
Areas are summed over the split: IoU_k = |pred=k and label=k| / |pred=k or label=k| (NaN for a class absent from
both), mIoU = nanmean(IoU), aAcc = correct pixels / labelled pixels.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MIN_IMAGE_SIDE
from ..model import DenseCLIP
from ..model.denseclip import check_test_image_size
from ..preprocess import image_size, normalize_keep_ratio, to_tensor
from ..validation import MAX_LABEL, as_bool, as_int, check_ignore_index, finite_real, given_dtype
from .data import IGNORE, SegmentationData


class ClassMetrics(TypedDict):
    """One class's entry of ``per_class``: None where mmseg's value is NaN (Acc: no label of the class; IoU: neither
    a label nor a prediction of it)."""

    IoU: float | None
    Acc: float | None


class Metrics(TypedDict):
    """What SegmentationMetrics.results returns: fractions (0.4515), NaN where the split defines none (no labelled
    pixel at all); ``per_class`` in class order, keyed by per_class_keys."""

    mIoU: float
    mAcc: float
    aAcc: float
    per_class: dict[str, ClassMetrics]


class Evaluation(Metrics):
    """What evaluate returns: the metrics and how they were made."""

    images: int
    mode: str
    scales: list[float]
    flip: bool


def _host_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _class_indices(name: str, x: object) -> np.ndarray:
    """``x`` (a numpy array or a tensor on any device) as an int64 array; ValueError naming ``name`` unless it
    holds integers (float predictions would be truncated to classes, booleans counted as classes 0 and 1)."""
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a numpy array or a tensor of class indices, got {type(x).__name__}")
    array = _host_array(x)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}")
    return array.astype(np.int64, copy=False)


class SegmentationMetrics:
    """Accumulates intersection/union/prediction/label areas per class."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        num_classes = as_int("num_classes", num_classes, maximum=MAX_LABEL, why_most=" (a label PNG's largest value)")
        ignore_index = check_ignore_index(ignore_index)
        if ignore_index < num_classes:  # as SegmentationData's: its class's pixels would silently not count
            raise ValueError(f"ignore_index {ignore_index} is a class index (0..{num_classes - 1}); ignored pixels "
                             "need a value >= num_classes (255; 65535 in 16-bit labels)")  # fmt: skip
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersect = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)
        self.pred_area = np.zeros(num_classes, dtype=np.int64)
        self.label_area = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor) -> None:
        """Add one image's (or batch's) areas; tensors may be on any device. ValueError for a class index outside
        0..num_classes-1 where the label is not ignore_index (it would not be counted)."""
        pred, label = _class_indices("pred", pred), _class_indices("label", label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} must have the same shape")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]  # an ignored pixel's prediction is not counted, whatever it is
        k = self.num_classes
        for name, values, what in (("pred", pred, "not a class index"),
                                   ("label", label, f"neither ignore_index {self.ignore_index} nor a class index")):
            if values.size and not 0 <= values.min() <= values.max() < k:
                bad = values.min() if values.min() < 0 else values.max()
                raise ValueError(f"{name} holds {bad}, {what} (0..{k - 1})")
        inter = np.bincount(label[pred == label], minlength=k)[:k]
        area_pred = np.bincount(pred, minlength=k)[:k]
        area_label = np.bincount(label, minlength=k)[:k]
        self.intersect += inter
        self.pred_area += area_pred
        self.label_area += area_label
        self.union += area_pred + area_label - inter

    def all_reduce(self, failed: bool = False) -> int:
        """Sum the areas over the processes of the default process group (distributed evaluation); ``failed``: this
        process's evaluation raised (its areas are incomplete). Returns how many processes failed, summed in the same
        collective, so that one process's error reaches the others instead of leaving them waiting."""
        import torch.distributed as dist

        areas = np.stack([self.intersect, self.union, self.pred_area, self.label_area]).reshape(-1)
        flat = torch.from_numpy(np.append(areas, np.int64(failed)))
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        dist.all_reduce(flat)
        summed = flat.cpu().numpy()
        self.intersect, self.union, self.pred_area, self.label_area = summed[:-1].reshape(4, self.num_classes)
        return int(summed[-1])

    def results(self, class_names: Sequence[str] | None = None) -> Metrics:
        """mIoU, mAcc, aAcc and ``per_class``: {key: {"IoU", "Acc"}} in class order (None for NaN), keyed as
        per_class_keys words ``class_names`` (default: the class indices)."""
        if class_names is not None and (isinstance(class_names, str) or not isinstance(class_names, Sequence)
                                        or not all(isinstance(name, str) for name in class_names)):  # fmt: skip
            raise ValueError(f"class_names must be a list of str (one name per class, in class order), got "
                             f"{reprlib.repr(class_names)}")  # fmt: skip
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but the metrics have {self.num_classes} "
                             "classes")  # fmt: skip
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersect / self.union
            acc = self.intersect / self.label_area
        total = self.label_area.sum()
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan,
            "aAcc": float(self.intersect.sum() / total) if total else math.nan,
            "per_class": {n: {"IoU": None if math.isnan(i) else float(i), "Acc": None if math.isnan(a) else float(a)}
                          for n, i, a in zip(per_class_keys(names), iou, acc)},
        }  # fmt: skip


# the metrics the commands print and the trainer logs, in that order
HEADLINE: tuple[Literal["mIoU", "aAcc", "mAcc"], ...] = ("mIoU", "aAcc", "mAcc")


def results_json(result: Mapping[str, Any]) -> str:
    """The results as JSON text, a NaN metric (a split without one labelled pixel: every label ignored) written as
    ``null``, as ``per_class`` writes them: a bare NaN is not JSON, and strict readers refused the file."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    return json.dumps(clean, indent=2, allow_nan=False)


def results_from_json(text: str) -> Evaluation | None:
    """What results_json wrote, read back as evaluate returned it: a headline metric written as null is NaN again.
    None for text that holds no evaluation."""
    try:
        evaluation = json.loads(text)
    except ValueError:
        return None
    if not isinstance(evaluation, dict) or "mIoU" not in evaluation:
        return None
    for key in HEADLINE:
        if evaluation.get(key, 0.0) is None:
            evaluation[key] = math.nan
    return cast(Evaluation, evaluation)


def summary(result: Mapping[str, Any]) -> str:
    """The headline metrics as the commands print them: ``mIoU 41.23  aAcc 79.80  mAcc 52.10`` (percent; "n/a" for
    a metric the split does not define, written as null in the JSON)."""
    def percent(key: str) -> str:
        value = result.get(key)
        return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    return "  ".join(f"{key} {percent(key)}" for key in HEADLINE)


def per_class_keys(names: Sequence[str]) -> list[str]:
    """One distinct key per class for the ``per_class`` results: its name, or "NAME [i]" (i: its class index) for a
    name that several classes share (a trained head's names may repeat; keyed by name, one class's entry would
    replace the other's). Should a key made so equal another class's name, every class gets its index."""
    counts = Counter(names)
    keys = [name if counts[name] == 1 else f"{name} [{i}]" for i, name in enumerate(names)]
    if len(set(keys)) < len(keys):  # e.g. classes "a", "a" and "a [1]"; keys ending in " [i]" all differ
        keys = [f"{name} [{i}]" for i, name in enumerate(names)]
    return keys


# the longest side a scaled test scale may have (the official multi-scale test goes to 1.75 x 2048 = 3584): 150
# float32 score maps of 8192 x 2048 are 10 GB; 1e9 ran into an allocation of hundreds of gigabytes
MAX_SCALED_SIDE = 8192


def check_scales(scales: Sequence[float], test_scale: Sequence[int], name: str = "scales") -> list[float]:
    """``scales`` as a list of floats if each is a finite ratio > 0 at which the test scale keeps the network's
    MIN_IMAGE_SIDE pixels on its short side (below it no image could be evaluated); ValueError naming ``name``."""
    try:  # a mapping's keys are no ratios given
        ratios = [] if isinstance(scales, (str, Mapping)) else list(scales)
    except TypeError:
        ratios = []
    if not ratios:
        raise ValueError(f"{name} must be a non-empty sequence of ratios of the test scale, e.g. (0.5, 1.0), got "
                         f"{scales!r}")  # fmt: skip
    short = min(test_scale)
    for ratio in ratios:
        value = finite_real(ratio)
        if value is None or value <= 0:
            raise ValueError(f"{name} must be finite ratios > 0 of the test scale, got {ratio!r}")
        if int(short * value) < MIN_IMAGE_SIDE:
            lowest = math.ceil(MIN_IMAGE_SIDE / short * 1e4) / 1e4  # rounded up: the advice must pass
            raise ValueError(
                f"{name}: {ratio} x the test scale {tuple(test_scale)} leaves {int(short * value)} pixels for the "
                f"short side, under the network's {MIN_IMAGE_SIDE}; use ratios >= {lowest:g}"
            )
        if max(test_scale) * value > MAX_SCALED_SIDE:
            highest = math.floor(MAX_SCALED_SIDE / max(test_scale) * 1e4) / 1e4
            raise ValueError(
                f"{name}: {ratio} x the test scale {tuple(test_scale)} makes its long side {max(test_scale) * value:g} "
                f"pixels, over {MAX_SCALED_SIDE} (the scores of every class at that size would not fit in memory); "
                f"use ratios <= {highest:g}"
            )
    return [float(r) for r in ratios]


def check_image_sizes(
    data: SegmentationData, test_scale: Sequence[int], scales: Sequence[float], indices: Sequence[int] | None = None
) -> None:
    """ValueError naming the first image of ``data`` (of ``indices``, default all) that the network cannot take
    at one of ``scales`` (too elongated: resized to fit the test scale, a side falls under MIN_IMAGE_SIDE), or
    whose label's size differs from its own (SegmentationData.check_label_sizes), read from the files' headers
    before any work."""
    indices = range(len(data)) if indices is None else list(indices)  # read twice: here and by check_label_sizes
    for i in indices:
        path = data.samples[i].image
        size = image_size(path)
        for ratio in scales:
            check_test_image_size(size, [int(s * ratio) for s in test_scale], path)
    data.check_label_sizes(indices)


@torch.no_grad()
def predict_probabilities(
    model: DenseCLIP,
    image: np.ndarray,
    mode: str = "slide",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(K, H, W) float32 softmax probabilities of a uint8 (H, W, 3) image, averaged over scales and flips."""
    device = model.contexts.device
    height, width = image.shape[:2]
    raw = to_tensor(image).to(device)
    total = torch.zeros(model.num_classes, height, width, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32)
    for ratio in scales:
        scale = [int(s * ratio) for s in model.config.test_scale]
        x = normalize_keep_ratio(raw, scale)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            with autocast:
                logits = model(xi) if mode == "whole" else model.slide_inference(xi)
            # in mmseg's order (its inference): resized to the image's size, softmax, then mirrored back; mirroring
            # the logits before the resize samples them at other, float32-rounded, positions
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            probs = logits[0].softmax(dim=0)
            total += probs.flip(-1) if flipped else probs
    return total / (len(scales) * (2 if flip else 1))


AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_evaluate_arguments(
    model: object, data: object, flip: object, dtype: object, limit: object, progress: object, rank: object,
    world: object,
) -> tuple[int | None, int, int, bool, bool]:
    """ValueError naming the first of evaluate's arguments that is wrong (a rank outside the world evaluated an image
    twice or none, a flip of "no" flipped); ``limit``, ``rank`` and ``world`` as plain ints, ``flip`` and
    ``progress`` as plain bools (numpy's taken: validation.as_int, as_bool)."""
    if not isinstance(model, DenseCLIP):
        raise ValueError(f"model must be a denseclip_fast.DenseCLIP, got {type(model).__name__}")
    if not isinstance(data, SegmentationData):
        raise ValueError(f"data must be a SegmentationData (a split of a data set), got {type(data).__name__}")
    switches = as_bool("flip", flip), as_bool("progress", progress)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in AUTOCAST_DTYPES):
        raise ValueError(f"dtype must be None (float32) or one of {AUTOCAST_DTYPES} (the autocast dtype), got "
                         f"{given_dtype(dtype, AUTOCAST_DTYPES)}")  # fmt: skip
    count = None if limit is None else as_int("limit", limit, 1, " (None: every image)")
    world = as_int("world", world)
    rank = as_int("rank", rank, 0)
    if rank >= world:
        raise ValueError(f"rank must be in 0..{world - 1} (world {world}), got {rank}")
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world {world} needs the default process group initialised (torchrun, then "
                             "torch.distributed.init_process_group); it is not")  # fmt: skip
        if (rank, world) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(f"rank {rank} and world {world} must be the process group's: rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}")  # fmt: skip
    return count, rank, world, *switches


def evaluate(
    model: DenseCLIP,
    data: SegmentationData,
    *,
    mode: str = "slide",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    dtype: torch.dtype | None = None,
    limit: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Evaluation:
    """Metrics of ``model`` (in eval mode while it runs) over ``data`` (a "val" SegmentationData). With
    ``world`` > 1 (an initialised process group) each process takes every world-th image and the areas are summed
    over the processes; every process returns the same result."""
    limit, rank, world, flip, progress = _check_evaluate_arguments(model, data, flip, dtype, limit, progress, rank,
                                                                   world)  # fmt: skip
    if model.num_classes != len(data.class_names):
        raise ValueError(
            f"the model has {model.num_classes} classes but the data set has {len(data.class_names)} "
            f"({len(data.class_names)} names in its class list)"
        )
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    scales = check_scales(scales, model.config.test_scale)
    count = len(data) if limit is None else min(limit, len(data))
    indices = range(rank, count, world)
    check_image_sizes(data, model.config.test_scale, scales, indices)
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(model.num_classes, data.ignore_index)
    if progress and rank == 0:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img")
    error: Exception | None = None
    try:
        for i in indices:
            image, label, _ = data[i]
            pred = predict_probabilities(model, image, mode, scales, flip, dtype).max(dim=0).indices
            metrics.update(pred.cpu().numpy(), label)
    except (ValueError, OSError) as exc:  # a bad file, read by this process alone: the others must hear of it
        if world == 1:
            raise
        error = exc
    finally:
        model.train(was_training)
    if world > 1:
        failed = metrics.all_reduce(failed=error is not None)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"the evaluation failed in {failed} other process(es) (a file they read: see their "
                               "error); this one's images were fine")  # fmt: skip
    return {**metrics.results(data.class_names), "images": count, "mode": mode, "scales": list(scales), "flip": flip}
