"""The warning the engine gives when it falls back to a slower path for some inputs."""

from __future__ import annotations


class EngineFallbackWarning(RuntimeWarning):
    """Part of the engine falls back to a slower path from now on, with the same results: a CUDA graph's capture
    failed for an input shape (that shape runs eagerly), or cuDNN's fused convolution failed (that convolution runs
    as PyTorch's). A category of its own, so that a latency-sensitive pipeline can make it an error
    (``warnings.simplefilter("error", EngineFallbackWarning)``) or silence it without matching the message."""
