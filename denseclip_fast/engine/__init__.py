"""The inference engine (Segmenter) and the rewrites and CUDA-graph machinery it uses."""

from .fallback import EngineFallbackWarning
from .graphs import GraphCache
from .rewrite import fold_batchnorm
from .segmenter import Segmenter

__all__ = ["EngineFallbackWarning", "GraphCache", "Segmenter", "fold_batchnorm"]
