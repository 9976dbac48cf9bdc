"""denseclip_fast: a fast, exact inference engine for DenseCLIP (Rao et al., CVPR 2022).

    import denseclip_fast as dcf
    model = dcf.load_checkpoint("denseclip_fpn_res50.pth")      # eval mode, CPU, float32
    logits = model(x)                                            # x: CLIP-normalised (B, 3, H, W)
    seg = dcf.Segmenter(model, device="cuda", dtype=torch.bfloat16, mode="slide")
    labels = seg.predict(images)                                 # uint8 images, the official test pipeline

Deployment: ``denseclip_fast.export`` (ONNX, TensorRT, AOTInductor). Training: ``denseclip_fast.train``.
"""

from .checkpoints import CheckpointError, load_checkpoint
from .class_names import ADE20K_CLASSES
from .config import DenseCLIPConfig, preset
from .engine import Segmenter
from .model import DenseCLIP

__version__ = "0.1.0"

__all__ = [
    "ADE20K_CLASSES",
    "CheckpointError",
    "DenseCLIP",
    "DenseCLIPConfig",
    "Segmenter",
    "load_checkpoint",
    "preset",
]
