"""Run by tests/test_triton_aot.py in a subprocess: traces every Triton operator with AOTAutograd, as torch.compile
does, on a stand-in sm_90 driver (no GPU needed; Triton's interpreter must be off, so that the kernels are real
JITFunctions whose TTIR torch analyses), and prints each kernel with the arguments torch would clone before the
launch because it believes the kernel writes them. An operator input among those means torch.compile copies that
input on every call (for the score backward: the whole visual map). Prints "INPUT CLONED ..." lines for those."""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _StandInDriver:
    """What the tracing asks of Triton's active driver, for an sm_90 GPU that is not there."""

    backend = "cuda"

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):  # noqa: ANN201
        return torch.cuda

    def get_current_stream(self, *args: object) -> int:
        return 0

    def __getattr__(self, name: str):  # noqa: ANN204
        raise AttributeError(name)


driver.set_active(_StandInDriver())

import torch._higher_order_ops.triton_kernel_wrap as wrap  # noqa: E402

from denseclip_fast.ops import triton as _registered  # noqa: E402, F401  (registers the *_triton operators)
from denseclip_fast.ops.triton import score  # noqa: E402

VIEWS = {"slice", "view", "as_strided", "transpose", "permute", "expand", "alias", "unsqueeze", "squeeze", "select"}


class _Traced(Exception):
    pass


def _compiler(gm: torch.fx.GraphModule, inputs: object) -> None:
    raise _Traced(gm)


def _from_input(node: torch.fx.Node) -> bool:
    """Whether the node is a graph input or a view of one."""
    while node.op != "placeholder":
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        if node.op != "call_function" or name not in VIEWS or not node.args:
            return False
        node = node.args[0]
    return True


def check(label: str, fn, *args: torch.Tensor) -> None:  # noqa: ANN001
    try:
        aot_function(fn, fw_compiler=_compiler)(*args)
        raise RuntimeError(f"{label}: nothing traced")
    except _Traced as traced:
        graph = traced.args[0].graph
    for node in graph.nodes:
        if "triton_kernel_wrapper" not in str(node.target):
            continue
        kernel = wrap.kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
        cloned = node.kwargs.get("tensors_to_clone", [])
        print(f"{label} {kernel} clones {sorted(cloned)}")
        for name in cloned:
            arg = node.kwargs["kwargs"][name]
            if isinstance(arg, torch.fx.Node) and _from_input(arg):
                print(f"INPUT CLONED {label} {kernel} {name}")


ops = torch.ops.denseclip_fast
for dtype in (torch.float16, torch.float32):
    for layout in (torch.contiguous_format, torch.channels_last):
        v = torch.randn(2, 40, 5, 6, dtype=dtype).contiguous(memory_format=layout)
        feature = torch.randn(2, 3, 5, 6, dtype=dtype).contiguous(memory_format=layout)
        t = torch.randn(7, 40, dtype=dtype)
        full = torch.randn(2, 10, 5, 6, dtype=dtype).contiguous(memory_format=layout)
        tag = f"{dtype} {'nhwc' if layout == torch.channels_last else 'nchw'}"
        check(f"score {tag}", lambda v, t: ops.pixel_text_score_triton(v, t, 2.0), v, t)
        # the forward's other plans: the text norms from a launch of their own and the transposed kernel (16-bit
        # maps), the channels split
        for plan, thresholds in (("TEXT_NORMS_FROM", (None, 0)), ("ROWS_FROM", (0, None)),
                                 ("SPLIT_C_PER_SM", (None, None, 64))):  # fmt: skip
            with score.forward_plan(*thresholds):
                check(f"score {plan} {tag}", lambda v, t: ops.pixel_text_score_triton(v, t, 2.0), v, t)
        check(f"concat {tag}", lambda f, v, t: ops.score_concat_triton(f, v, t, 2.0), feature, v, t)
        norm = torch.rand(2, 5, 6) + 0.5
        check(f"score_backward {tag}", lambda g, v, t: ops.pixel_text_score_backward_triton(g[:, 3:], v, t, 2.0),
              full, v, t)  # fmt: skip
        # as autograd calls it: with the forward's outputs, the map a channel slice as score_concat's, and the norms
        check(f"score_backward with map {tag}",
              lambda g, v, t, m, n: ops.pixel_text_score_backward_triton(g[:, 3:], v, t, 2.0, m[:, 3:], n),
              full, v, t, full.clone(), norm)  # fmt: skip
        wide_t = torch.randn(300, 40, dtype=dtype)  # past one class block: the unfused kernel and the text GEMM
        check(f"score_backward unfused {tag}",
              lambda g, v, t, m, n: ops.pixel_text_score_backward_triton(g, v, t, 2.0, m, n),
              torch.randn(2, 300, 5, 6, dtype=dtype), v, wide_t, torch.randn(2, 300, 5, 6, dtype=dtype),
              norm)  # fmt: skip
    q, k, val = (torch.randn(2, 4, n, 64, dtype=dtype) for n in (9, 33, 33))
    check(f"attention {dtype}", lambda q, k, val: ops.context_attention_triton(q, k, val)[0], q, k, val)
    out, lse = torch.randn(2, 4, 9, 64, dtype=dtype), torch.randn(2, 4, 9)
    check(f"attention_backward {dtype}",
          lambda g, q, k, val, o, m: ops.context_attention_backward_triton(g, q, k, val, o, m), torch.randn_like(q),
          q, k, val, out, lse)  # fmt: skip
