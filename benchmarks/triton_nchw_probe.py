"""Which Triton score-kernel specialisations compute wrong results on this GPU (a diagnosis for a GPU session).

    python benchmarks/triton_nchw_probe.py [--out benchmarks/results] [--tag NAME] [--quick]

On an H200 (Triton 3.6.0, 2026-12-04) the score forward on NCHW float16/bfloat16 maps whose H x W is a multiple of
16, at 150 and 171 classes (one 256-row class block, 8 warps), was 3-14% off, while NHWC maps, NCHW maps of other
sizes and float32 were right. Since then a GPU takes 16-bit NCHW maps through an NHWC copy (score.NHWC_ONLY_16BIT),
and the compiled kernel was found (without a GPU) to race: the pipeline's next copies overwrote the dot's
shared-memory tiles while the wgmma read them, because the norms read the same tiles. The kernel now takes its norms
from loads of its own. Where every row here is right, the copy can go.

This launches the forward kernel itself, bypassing the copy, for each kernel (KERNELS: the default, the same with
the text norms from a launch of their own (score.TEXT_NORMS_FROM), and the transposed one of score.ROWS_FROM, which
takes the visual tile as a wgmma operand from registers), layout (NCHW with H x W a multiple of 16, NCHW without,
NHWC), class count (one 64-, 128- and 256-row class block), warps and software-pipelining stages (VARIANTS, and
ROWS_VARIANTS for the other two kernels); and the backward through the launcher with the copy switched off. Each
result is compared with the float64 reference, and each forward is launched twice ("repeatable": bit for bit the
same, which a race need not be). A forward is "wrong" past the operator tests' tolerance (2e-3 float16, 2e-2
bfloat16, relative to the result's norm; right ones are near 2e-4 and 3e-3), a backward past twice it. Writes JSON
and markdown. On a CPU (Triton's interpreter, which computes every variant right) --quick runs a
few variants as a smoke test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Results, failure, rel_err, triton_device  # noqa: E402
from benchmarks.common import environment as common_environment  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
LAYOUTS = {"NCHW, H x W = 256": (16, 16, False), "NCHW, H x W = 255": (15, 17, False),
           "NHWC, H x W = 256": (16, 16, True)}  # (H, W, channels_last)
CLASSES = [64, 128, 150]  # one class block of 64, 128 and 256 rows
# (warps, software-pipelining stages) per dtype, warps None: the launcher's (4 up to 128 classes, 8 past them; the
# rows kernel's 8): for the default kernel (every variant of 4 and 8 warps right on an H200 in h200_2026-12-04b)
# and for the other two (deeper pipelines too)
VARIANTS = {torch.bfloat16: ([None], [1, 2, 3]), torch.float16: ([None], [3])}
ROWS_VARIANTS = {torch.bfloat16: ([None], [2, 3, 4]), torch.float16: ([None], [3])}
# The forward kernels probed: (score.ROWS_FROM, score.TEXT_NORMS_FROM) for each (the rows kernel reads the text norms)
KERNELS = {"channels": (None, None), "channels, text norms": (None, 0), "rows": (0, None)}
QUICK = {"layouts": ["NCHW, H x W = 256"], "classes": [150], "kernels": list(KERNELS),
         "variants": {kernel: {dtype: ([None], [1]) for dtype in TOL} for kernel in KERNELS}}  # fmt: skip


def _inputs(layout: str, k: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    h, w, nhwc = LAYOUTS[layout]
    visual = torch.randn(2, 64, h, w, device=device, dtype=torch.float64)
    if nhwc:
        visual = visual.contiguous(memory_format=torch.channels_last)
    return visual.to(dtype), torch.randn(k, 64, device=device, dtype=torch.float64).to(dtype)


def forward(
    visual: torch.Tensor, text: torch.Tensor, warps: int | None, stages: int, kernel: str = "channels"
) -> torch.Tensor:
    """The forward kernel launched as score_forward_into plans it (score._forward_launch: blocks, grid, strides),
    with these warps (None: the launcher's) and stages, on visual's own layout (no NHWC copy); ``kernel``: which
    plan (KERNELS), the text norms (where planned) from _text_norm_kernel as the launcher makes them."""
    from denseclip_fast.ops.triton import score

    b, c, h, w = visual.shape
    k = text.shape[0]
    out = torch.empty((b, k, h, w), dtype=visual.dtype, device=visual.device,
                      memory_format=score.score_memory_format(visual))  # fmt: skip
    norm = score.empty_norm(visual)
    key = (tuple(visual.shape), visual.stride(), tuple(text.shape), tuple(out.shape), out.stride(), visual.dtype)
    plan = score._forward_launch.__wrapped__(*key, *KERNELS[kernel])
    t_norm = score.text_norms(text) if plan.text_norms else norm  # read only if planned
    (score._score_fwd_rows_kernel if plan.rows else score._score_fwd_kernel)[plan.grid](
        visual, text, out, norm, t_norm, c, h * w, k, *plan.visual_strides, 0, text.stride(0), text.stride(1), 0,
        out.stride(0), out.stride(1), out.stride(3), 0.7, score.EPS, **plan.constexprs,
        num_warps=warps or plan.warps, num_stages=stages,
    )  # fmt: skip
    return out


def backward_errors(visual: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """The backward's relative errors (visual's gradient, text's) through the launcher with the NHWC copy off."""
    from denseclip_fast.ops.triton import score

    v64, t64 = visual.double().requires_grad_(), text.double().requires_grad_()
    expected = torch.nn.functional.normalize(t64, dim=-1)[None] @ torch.nn.functional.normalize(v64, dim=1).flatten(2)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    saved = score.NHWC_ONLY_16BIT
    score.NHWC_ONLY_16BIT = ()
    try:
        gv, gt = score.score_backward(grad.view(visual.shape[0], -1, *visual.shape[2:]).to(visual.dtype), visual,
                                      text, 1.0)  # fmt: skip
    finally:
        score.NHWC_ONLY_16BIT = saved
    assert v64.grad is not None and t64.grad is not None
    return rel_err(gv, v64.grad), rel_err(gt, t64.grad)


def render(env: dict, rows: list[dict]) -> str:
    lines = [f"# Triton score kernels by specialisation: {env['device']}", "",
             f"{env['date']}, torch {env['torch']}, triton {env.get('triton')}; forward: the kernel launched directly "
             "on the layout given; backward: the launcher with the NHWC copy off. Relative error against float64; "
             "'wrong' past the operator tests' tolerance (twice it for a backward).", "",
             "| pass | kernel | layout | classes | dtype | warps | stages | relative error | repeatable | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        err = r.get("error")
        cell = r["failed"] if "failed" in r else f"{err:.1e}"
        verdict = "failed" if "failed" in r else ("WRONG" if r["wrong"] else "right")
        repeatable = {True: "yes", False: "NO", None: ""}[r.get("repeatable")]
        lines.append(f"| {r['pass']} | {r.get('kernel', '')} | {r['layout']} | {r['classes']} | {r['dtype']} | "
                     f"{r.get('warps', '')} | {r.get('stages', '')} | {cell} | {repeatable} | {verdict} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default=None)
    parser.add_argument("--quick", action="store_true", help="a few variants (a smoke test on a CPU)")
    args = parser.parse_args(argv)
    device = triton_device("triton_nchw_probe")
    if device is None:
        return 1
    env = common_environment(device)
    results = Results(args.out, "triton_nchw_probe", args.tag, env, {}, render)
    plan: dict[str, Any] = QUICK if args.quick else {"layouts": list(LAYOUTS), "classes": CLASSES,
                                                     "kernels": list(KERNELS),
                                                     "variants": {kernel: VARIANTS if kernel == "channels" else
                                                                  ROWS_VARIANTS for kernel in KERNELS}}  # fmt: skip
    torch.manual_seed(0)
    for dtype, layout, k in itertools.product(TOL, plan["layouts"], plan["classes"]):
        visual, text = _inputs(layout, k, dtype, device)
        reference = torch.einsum("kc,bchw->bkhw", torch.nn.functional.normalize(text.double(), dim=-1),
                                 torch.nn.functional.normalize(visual.double(), dim=1)) * 0.7  # fmt: skip
        base = {"layout": layout, "classes": k, "dtype": str(dtype).removeprefix("torch.")}
        variants = [(kernel, warps, stages) for kernel in plan["kernels"]
                    for warps, stages in itertools.product(*plan["variants"][kernel][dtype])]  # fmt: skip
        for kernel, warps, stages in variants:
            row: dict[str, Any] = {"pass": "forward", **base, "kernel": kernel, "warps": warps or "launcher's",
                                   "stages": stages}  # fmt: skip
            try:
                first = forward(visual, text, warps, stages, kernel)
                row["error"] = rel_err(first, reference)
                row["wrong"] = row["error"] > TOL[dtype]
                row["repeatable"] = torch.equal(first, forward(visual, text, warps, stages, kernel))
            except Exception as exc:  # a variant that does not compile is reported, the others still run
                row["failed"] = failure(exc)
            results.add(row)
            print(row, flush=True)
        row = {"pass": "backward", **base}
        try:
            errors = backward_errors(visual, text)
            row["error"] = max(errors)
            row["wrong"] = row["error"] > 2 * TOL[dtype]
        except Exception as exc:
            row["failed"] = failure(exc)
        results.add(row)
        print(row, flush=True)
    print(f"wrote {results.save()}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
