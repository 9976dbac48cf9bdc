"""The text encoder's shared start against every prompt run whole, in one process (a benchmark).

    python benchmarks/bench_text.py                                  # CPU float32, ADE20K's names, 3 rounds
    python benchmarks/bench_text.py --device cuda --repeats 50       # float32 and bfloat16 autocast
    python benchmarks/bench_text.py --modes onnx                     # the exported ONNX text graph, ONNX Runtime

The context text encoder (denseclip_fast/model/text.py) computes the prompts' shared start (SOT and the 8 learned
contexts) once and then each class's positions up to the vocabulary's last EOT; the official encoder runs all 13
positions of every prompt. This times both on the same random-weight RN50 text encoder, for what a user waits for:
``embed``, the class embeddings of a vocabulary without gradients (a Segmenter's construction, set_classes, a new
open vocabulary), ``train``, the forward and the backward to the contexts with the encoder frozen (every training
step runs it), and ``onnx`` (not by default; ONNX Runtime's CPU provider, whatever --device says), the class
embeddings from the ONNX text graph that ``to_onnx(graph="text")`` writes (the shared start over all 5 name
positions: a graph cannot read the tokens) against the same graph exported with every prompt whole. Vocabularies:
``ade20k``, its 150 names (1 to 3 BPE tokens: the last EOT at position 4 of the 5 name tokens), and ``one-token``,
its 119 names of one token (span 3). The two paths take turns, which one goes first alternating from round to round,
after one untimed round. Error: relative L2 of the shared start's embeddings (and, for train, of the contexts'
gradient) against the whole prompts'. Writes JSON and markdown (text_encoder_<tag>.*).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import denseclip_fast as dcf  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Results,
    environment,
    rel_err,
    take_turns,
    turn_arguments,
    turn_device,
    turn_fields,
    turn_versions,
)
from benchmarks.official import randomize_  # noqa: E402
from denseclip_fast.model.text import _bpe, token_span, tokenize_class_names  # noqa: E402

PATHS = ("whole", "shared")
MODES = ("embed", "train", "onnx")
VOCABULARIES = ("ade20k", "one-token")


def vocabulary(name: str) -> list[str]:
    names = list(dcf.ADE20K_CLASSES[:150])
    if name == "one-token":
        bpe = _bpe()
        names = [n for n in names if len(bpe.encode(n)) == 1]
    return names


def step(
    model: dcf.DenseCLIP, tokens: torch.Tensor, span: int | None, path: str, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The class embeddings of ``tokens`` by ``path`` (the shared start given the span, as DenseCLIP gives it: no
    read of the tokens per call; called directly, since the encoder's forward takes it on a CPU only); with mode
    train also the contexts' gradient of their sum weighted by a fixed pattern (a loss that reaches every
    embedding)."""
    enc = model.text_encoder
    with torch.set_grad_enabled(mode == "train"):
        contexts = model.contexts
        if path == "whole":
            out = enc._whole_prompts(tokens, contexts)
        else:
            assert span is not None, "the shared start needs the span"
            out = enc._shared_start(tokens, contexts, span)
        if mode == "embed":
            return out, None
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
        (grad,) = torch.autograd.grad((out.float() * weights).sum(), contexts)
        return out.detach(), grad


def onnx_graphs(model: dcf.DenseCLIP, workdir: str) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The ONNX text graph of ``model`` in ONNX Runtime (CPU provider, default threads), per path: ``shared`` as
    to_onnx writes it, ``whole`` exported with TextGraph running every prompt whole (as before the shared start)."""
    import onnxruntime as ort

    from denseclip_fast.export import to_onnx
    from denseclip_fast.export.graphs import TextGraph

    def whole(graph: TextGraph, class_tokens: torch.Tensor) -> torch.Tensor:
        return graph.text_encoder._whole_prompts(class_tokens, graph.contexts)

    graphs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for path in PATHS:
        with mock.patch.object(TextGraph, "forward", whole) if path == "whole" else contextlib.nullcontext():
            file = to_onnx(model, os.path.join(workdir, f"text_{path}.onnx"), graph="text")
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        graphs[path] = functools.partial(_run_session, session)
    return graphs


def _run_session(session: Any, tokens: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"class_tokens": tokens.numpy()})[0])


def run_case(model: dcf.DenseCLIP, device: torch.device, dtype: str, vocab: str, mode: str, repeats: int,
             onnx: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict:  # fmt: skip
    names = vocabulary(vocab)
    tokens = tokenize_class_names(names, model.config.text.class_token_length)
    span = token_span(tokens)
    if mode == "onnx":
        assert onnx is not None
        device, span = torch.device("cpu"), tokens.shape[1]  # the graph computes all positions after the start
    tokens = tokens.to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())  # fmt: skip

    def call(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast:
            return (onnx[path](tokens), None) if onnx is not None else step(model, tokens, span, path, mode)

    times, outputs = take_turns({path: functools.partial(call, path) for path in PATHS}, repeats, device)
    (shared, shared_grad), (whole, whole_grad) = outputs["shared"], outputs["whole"]
    grad_error = None if shared_grad is None or whole_grad is None else rel_err(shared_grad, whole_grad)
    row = {"device": "cpu (onnxruntime)" if onnx is not None else device.type, "dtype": dtype, "vocabulary": vocab,
           "classes": len(names), "span": span, "mode": mode, "repeats": repeats,
           "rel_error": rel_err(shared.float(), whole.float()), "grad_rel_error": grad_error}  # fmt: skip
    return {**row, **turn_fields(times)}


def table(env: dict, rows: list[dict]) -> str:
    versions = turn_versions(env)
    versions += f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""
    lines = [
        f"# Text encoder: shared start vs every prompt whole ({env['date']})",
        "",
        f"{env['device']} ({env['threads']} CPU threads); {versions}; commit {env['commit']}. The RN50 text encoder "
        "(12 layers, width 512, 8 contexts), random weights. embed: class embeddings without gradients (a "
        "Segmenter's construction, set_classes, a new open vocabulary); train: forward and backward to the "
        "contexts (every training step); onnx: the ONNX text graph in ONNX Runtime (whole: exported with every "
        "prompt whole). span: the positions of the class tokens computed (of 5). The paths take "
        "turns; milliseconds. Error: relative L2 of the shared start's embeddings (grad: of the contexts' "
        "gradient) against the whole prompts'.",
        "",
        "| device | dtype | vocabulary | K | span | mode | whole median | shared median | whole / shared | whole min "
        "| shared min | error | grad error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grad = "" if r["grad_rel_error"] is None else f"{r['grad_rel_error']:.1e}"
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['vocabulary']} | {r['classes']} | {r['span']} | {r['mode']} | "
            f"{r['whole_median_ms']:.2f} | {r['shared_median_ms']:.2f} | "
            f"{r['whole_median_ms'] / r['shared_median_ms']:.2f}x | {r['whole_min_ms']:.2f} | "
            f"{r['shared_min_ms']:.2f} | {r['rel_error']:.1e} | {grad} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabularies", nargs="+", choices=VOCABULARIES, default=list(VOCABULARIES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["embed", "train"])
    turn_arguments(parser, repeats=3, device_help="cpu (float32) or cuda (float32 and bfloat16 autocast)")
    args = parser.parse_args(argv)
    device = turn_device(parser, args)
    torch.manual_seed(0)
    model = randomize_(dcf.DenseCLIP.from_arch("RN50")).eval().requires_grad_(False).to(device)
    model.contexts.requires_grad_(True)  # the trainer's: the encoder frozen, the contexts learning
    results = Results(args.out, "text_encoder", args.tag, environment(device), {"args": vars(args)}, table)
    if "onnx" in args.modes:
        try:
            import onnxruntime
        except ImportError:
            parser.error("--modes onnx needs onnxruntime (and onnxscript for the export): pip install onnxruntime "
                         "onnxscript")  # fmt: skip
        results.env["onnxruntime"] = onnxruntime.__version__
    dtypes = ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]
    with tempfile.TemporaryDirectory() as workdir:
        onnx = onnx_graphs(model.cpu(), workdir) if "onnx" in args.modes else None
        model.to(device)
        for dtype in dtypes:
            for vocab in args.vocabularies:
                for mode in args.modes:
                    if mode == "onnx" and dtype != "float32":
                        continue  # the float32 graph
                    results.add(run_case(model, device, dtype, vocab, mode, args.repeats,
                                         onnx if mode == "onnx" else None))  # fmt: skip
    print(results.render(results.env, results.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
