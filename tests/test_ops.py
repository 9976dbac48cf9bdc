"""The operator wrappers in denseclip_fast.ops against their definition."""

from __future__ import annotations

import pytest
import torch

from denseclip_fast import ops


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 7, 3, 5, 4), (3, 33, 9, 1, 17)])
def test_pixel_text_score_is_the_cosine(shape, shared):
    b, c, h, w, k = shape
    visual = torch.randn(b, c, h, w, dtype=torch.float64)
    text = torch.randn(k, c, dtype=torch.float64) if shared else torch.randn(b, k, c, dtype=torch.float64)
    out = ops.pixel_text_score(visual, text, scale=2.5)
    t = text.expand(b, k, c) if shared else text
    expected = torch.empty(b, k, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                v = visual[i, :, y, x]
                expected[i, :, y, x] = 2.5 * (t[i] @ v) / (t[i].norm(dim=1) * v.norm())
    assert torch.allclose(out, expected)


def test_zero_vectors_score_zero_and_channels_last():
    visual = torch.randn(1, 4, 3, 3)
    visual[0, :, 1, 1] = 0
    text = torch.randn(2, 4)
    text[1] = 0
    out = ops.pixel_text_score(visual, text)
    assert torch.equal(out[0, :, 1, 1], torch.zeros(2)) and torch.equal(out[0, 1], torch.zeros(3, 3))
    cl = ops.pixel_text_score(visual.to(memory_format=torch.channels_last), text)
    assert torch.allclose(cl, out)


@pytest.mark.parametrize(
    "visual, text, match",
    [
        (torch.randn(2, 3, 4), torch.randn(5, 3), r"visual must be a \(B, C, H, W\) tensor"),
        (torch.randn(1, 3, 2, 2), torch.randn(5), r"text must be a \(K, C\) or \(B, K, C\)"),
        (torch.randn(1, 3, 2, 2), torch.randn(5, 4), "text has C=4 channels but visual has C=3"),
        (torch.randn(1, 3, 2, 2), torch.randn(0, 3), "K >= 1"),
        (torch.randn(2, 3, 2, 2), torch.randn(3, 5, 3), "per-batch text has B=3 but visual has B=2"),
        (torch.ones(1, 3, 2, 2, dtype=torch.int64), torch.randn(5, 3), "visual must be a float32, float64, float16 or bfloat16 tensor"),
        (torch.randn(1, 3, 2, 2), torch.randn(5, 3, device="meta"), "same device"),
    ],
)
def test_bad_inputs(visual, text, match):
    with pytest.raises(ValueError, match=match):
        ops.pixel_text_score(visual, text)


def test_reference_attention_is_sdpa():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(ops.reference.attention(q, k, v), expected, atol=1e-6)
