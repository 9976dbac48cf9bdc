"""The public Python API as a library user meets it: reprs, types a type checker sees, what import leaves alone."""

from __future__ import annotations

import pytest
import torch

from denseclip_fast import DenseCLIP, Segmenter

from .conftest import NAMES, tiny_config


@pytest.fixture(scope="module")
def model() -> DenseCLIP:
    torch.manual_seed(0)
    return DenseCLIP(tiny_config(), NAMES).eval()


def test_a_segmenters_repr_says_what_it_serves_on_one_line(model):
    """Not ``<... Segmenter object at 0x...>``: the architecture, class count, device, dtype and mode (with the
    window in slide mode), as a log line or a debugger shows it."""
    seg = Segmenter(model, device="cpu", dtype=torch.bfloat16, mode="slide", crop=64, stride=40)
    assert repr(seg) == ("Segmenter(arch='custom', num_classes=4, device='cpu', dtype=torch.bfloat16, mode='slide', "
                         "crop=64, stride=40)")  # fmt: skip
    whole = Segmenter(model, device="cpu", dtype=torch.float32)
    assert repr(whole) == "Segmenter(arch='custom', num_classes=4, device='cpu', dtype=torch.float32, mode='whole')"
