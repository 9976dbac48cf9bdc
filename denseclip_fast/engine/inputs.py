"""What the Segmenter accepts as images, turned into tensors with a clear error for anything else.

* a float tensor (B, 3, H, W) or (3, H, W): CLIP-normalised already, used as it is;
* uint8 images: a (B, H, W, 3) or (H, W, 3) tensor, a numpy array of those shapes, a PIL image, or a list of any of
  these (sizes may differ); they go through the official test pipeline on the engine's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch

from ..ops.checks import FLOAT_DTYPES
from ..preprocess import pil_to_rgb

if TYPE_CHECKING:  # for a type checker (PIL is imported where an image is read, not with the package)
    import PIL.Image

    # one image: uint8 (H, W, 3) as a tensor, a numpy array or a PIL image; or a float (B, 3, H, W) / (3, H, W)
    # CLIP-normalised tensor, or a uint8 (B, H, W, 3) tensor or array
    Image: TypeAlias = torch.Tensor | np.ndarray[Any, Any] | PIL.Image.Image
    # what the Segmenter's logits, predict and open_vocab take: one of those or a sequence of images
    Images: TypeAlias = Image | Sequence[Image]
else:
    Image = Images = Any


class UnnormalizedImagesWarning(UserWarning):
    """A float batch given to a Segmenter as CLIP-normalised holds values within 0..1 only: likely pixels scaled to
    0..1 (torchvision's ToTensor), whose results are wrong. A category of its own, so that a pipeline can filter it
    (``warnings.simplefilter("error", UnnormalizedImagesWarning)``) without matching the message."""


@dataclass
class ImageBatch:
    """Either ``normalized`` (B, 3, H, W) float, or ``raw``: uint8 (H, W, 3) images, grouped by size in ``groups``
    (lists of indices into ``raw`` whose images share a size)."""

    normalized: torch.Tensor | None = None
    raw: list[torch.Tensor] | None = None

    @property
    def groups(self) -> list[list[int]]:
        assert self.raw is not None
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(self.raw):
            by_size.setdefault(tuple(image.shape[:2]), []).append(i)
        return list(by_size.values())

    def __len__(self) -> int:
        return len(self.raw) if self.raw is not None else int(self.normalized.shape[0])  # type: ignore[union-attr]


def _uint8_image(x: Any, where: str) -> torch.Tensor:
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        # opened from a file (format set), a 32-bit integer image is one of 16 bits (Pillow 13 opens a 16-bit PGM,
        # older Pillows a 16-bit PNG, as "I"), as load_image reads it; made in memory, Pillow's conversion
        x = pil_to_rgb(x, where, int32_is_16_bit=getattr(x, "format", None) is not None)
    numpy = isinstance(x, np.ndarray)
    if numpy:
        if x.dtype != np.uint8:
            raise ValueError(f"{where}: numpy images must be uint8 (H, W, 3), got dtype {x.dtype}{_dtype_hint(x)}")
        # (ascontiguousarray would make a 0-d array 1-d, and the error below report shape (1,))
        x = torch.from_numpy(x if x.flags.writeable and x.flags.c_contiguous else x.copy(order="C"))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: expected an image (tensor, numpy array or PIL image), got {type(x).__name__}")
    _check_dense(x, where)
    if x.dtype != torch.uint8 and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: expected uint8 images (or one float (B, 3, H, W) batch, CLIP-normalised), got "
                         f"dtype {x.dtype}")  # fmt: skip
    if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[2] != 3:
        dtype = "uint8" if numpy else x.dtype
        raise ValueError(f"{where}: expected a uint8 (H, W, 3) image, got shape {tuple(x.shape)} dtype {dtype}"
                         f"{_layout_hint(x, numpy)}")  # fmt: skip
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{where}: zero-size image {tuple(x.shape[:2])}")
    return x


def _dtype_hint(x: np.ndarray) -> str:
    """How a numpy image of another dtype goes in, judged by its values (an error path: reading them is no cost
    that matters): "" where nothing fits (complex, object, NaN, values outside 0..255)."""
    if x.size == 0 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        return ""
    low, high = x.min(), x.max()
    if np.issubdtype(x.dtype, np.floating):
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
            return ": a CLIP-normalised image goes in as one float (B, 3, H, W) torch tensor (no preprocessing)"
        if high <= 1:
            return ": a 0..1 float image goes in as (image * 255).round().astype(np.uint8)"
        return ": a 0..255 float image goes in as image.round().astype(np.uint8)" if high <= 255 else ""
    if low >= 0 and high <= 255:
        return ": its values fit 8 bits: image.astype(np.uint8)"
    if x.dtype == np.uint16:
        return ": a 16-bit image goes in as its high byte, (image >> 8).astype(np.uint8), as image files are read"
    return ""


def _layout_hint(x: torch.Tensor, numpy: bool) -> str:
    """What an image that is not uint8 (H, W, 3) likely is, and how to pass it: "" where nothing fits."""
    if x.dtype != torch.uint8:
        if x.dim() == 3 and x.shape[0] == 3:
            return ": float images go in as one CLIP-normalised (B, 3, H, W) tensor (torch.stack them)"
        return ""
    if x.dim() == 3 and x.shape[0] == 3 and x.shape[2] != 3:
        fix = "image.transpose(1, 2, 0)" if numpy else "image.permute(1, 2, 0)"
        return f": a (3, H, W) image (torchvision.io.read_image's layout) goes in as {fix}"
    if x.dim() == 2:
        return ": a grayscale image goes in as RGB (PIL's .convert('RGB'), or its channel repeated 3 times)"
    if x.dim() == 3 and x.shape[2] == 4:
        return ": an RGBA image goes in as its RGB channels (image[..., :3], or PIL's .convert('RGB'))"
    return ""


def stacked_for(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size as one (B, H, W, 3) tensor to copy to ``device``: in page-locked memory
    when host images go to a CUDA device, so that ``.to(device, non_blocking=True)`` is one asynchronous DMA (from
    pageable memory the driver stages it through a bounce buffer and the host waits); PyTorch's caching host
    allocator keeps the buffer until the copy is done."""
    if device.type != "cuda" or any(image.device.type != "cpu" for image in images):
        return torch.stack(images)
    out = torch.empty((len(images), *images[0].shape), dtype=torch.uint8, pin_memory=True)
    return torch.stack(images, out=out)


def _check_dense(x: torch.Tensor, where: str) -> None:
    """ValueError naming ``where`` for a tensor without data in memory the pipeline can read: a meta tensor (shapes
    only), a sparse or nested one."""
    if x.is_meta or x.layout != torch.strided or x.is_nested:
        what = "a meta tensor (no data)" if x.is_meta else "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise ValueError(f"{where} must be a dense (strided) tensor with data, got {what}")


def as_batch(images: Any) -> ImageBatch:
    """Classify and check ``images``' types and shapes; raises ValueError naming what is wrong. (Their values, NaN
    and infinities, are the Segmenter's check_finite: on a GPU it reads the verdict after the forward is queued.)"""
    if isinstance(images, torch.Tensor):
        _check_dense(images, "images")
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.dtype not in FLOAT_DTYPES:
            raise ValueError(f"float images must be {', '.join(str(d) for d in FLOAT_DTYPES)}, got {images.dtype}")
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be CLIP-normalised (B, 3, H, W), got shape {tuple(images.shape)}")
        if x.shape[0] == 0:
            raise ValueError("images is an empty batch (B=0)")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"zero-size images {tuple(x.shape[2:])}")
        return ImageBatch(normalized=x)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B=0)")
        if images.dtype == torch.uint8 and images.shape[1] == 3 and images.shape[3] != 3:
            raise ValueError(f"images: expected a uint8 (B, H, W, 3) batch, got shape {tuple(images.shape)}: a "
                             "(B, 3, H, W) one goes in as images.permute(0, 2, 3, 1)")  # fmt: skip
        return ImageBatch(raw=[_uint8_image(img, f"images[{i}]") for i, img in enumerate(images)])
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (B=0)")
        return as_batch(list(images))
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        return ImageBatch(raw=[_uint8_image(img, f"images[{i}]") for i, img in enumerate(images)])
    return ImageBatch(raw=[_uint8_image(images, "images")])
