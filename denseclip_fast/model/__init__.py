"""The DenseCLIP model, one file per stage: resnet.py / vit.py (image encoders), text.py (context text encoder),
decoder.py (context decoder), heads.py (FPN and Semantic FPN head), slide.py (sliding windows), denseclip.py
(assembly)."""

from .denseclip import DenseCLIP
from .features import ImageFeatures

__all__ = ["DenseCLIP", "ImageFeatures"]
