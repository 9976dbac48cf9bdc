"""The inference engine (Segmenter) and the rewrites and CUDA-graph machinery it uses."""

from .graphs import GraphCache
from .rewrite import fold_batchnorm
from .segmenter import Segmenter

__all__ = ["GraphCache", "Segmenter", "fold_batchnorm"]
