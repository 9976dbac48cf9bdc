"""denseclip_fast: a fast, exact inference engine for DenseCLIP (Rao et al., CVPR 2022).

    import denseclip_fast as dcf
    model = dcf.load_checkpoint("denseclip_fpn_res50.pth")      # eval mode, CPU, float32
    logits = model(x)                                            # x: CLIP-normalised (B, 3, H, W)
    seg = dcf.Segmenter(model, device="cuda", dtype=torch.bfloat16, mode="slide")
    labels = seg.predict(images)                                 # uint8 images, the official test pipeline

Deployment: ``denseclip_fast.export`` (ONNX, TensorRT, AOTInductor). Training: ``denseclip_fast.train``.
"""

import torch

from .requirements import check_torch_version

check_torch_version(torch.__version__)  # before the modules that need a newer torch fail less clearly

from .checkpoints import CheckpointError, load_checkpoint  # noqa: E402
from .class_names import ADE20K_CLASSES  # noqa: E402
from .config import DenseCLIPConfig, preset  # noqa: E402
from .engine import Segmenter  # noqa: E402
from .engine.fallback import EngineFallbackWarning  # noqa: E402
from .engine.inputs import UnnormalizedImagesWarning  # noqa: E402
from .model import DenseCLIP  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ADE20K_CLASSES",
    "CheckpointError",
    "DenseCLIP",
    "DenseCLIPConfig",
    "EngineFallbackWarning",
    "Segmenter",
    "UnnormalizedImagesWarning",
    "load_checkpoint",
    "preset",
]
