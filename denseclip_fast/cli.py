"""The ``denseclip-fast`` command.

    denseclip-fast info CHECKPOINT [--json]
    denseclip-fast segment --checkpoint C [--classes "a,b,c"] [--open-vocab] [--mode slide|whole]
                           [--device cpu|cuda] [--dtype float32|bfloat16|float16] IMAGE... --out DIR

segment runs the engine (denseclip_fast.Segmenter): the official test pipeline on the chosen device.

Errors the user can fix (a bad file, a wrong class list) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .checkpoints import CheckpointError


def _parse_classes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--classes must be a comma-separated list of non-empty names, got {text!r}")
    return names


def cmd_info(args: argparse.Namespace) -> int:
    from . import load_checkpoint

    model = load_checkpoint(args.checkpoint)
    counts = model.parameter_counts()
    info = {
        "checkpoint": args.checkpoint,
        "arch": model.config.arch,
        "num_classes": model.num_classes,
        "classes": model.class_names,
        "parameters": counts["total"],
        "parameters_without_text_encoder": counts["without_text_encoder"],
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    shown = ", ".join(model.class_names[:10]) + (" ..." if model.num_classes > 10 else "")
    print(f"checkpoint   {args.checkpoint}")
    print(f"arch         {model.config.arch}")
    print(f"classes      {model.num_classes}: {shown}")
    print(f"parameters   {counts['total']:,} ({counts['without_text_encoder']:,} without the text encoder)")
    print(f"slide        crop {model.config.slide_crop}, stride {model.config.slide_stride}")
    return 0


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}  # fmt: skip


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from . import Segmenter, load_checkpoint
    from .preprocess import load_image
    from .visualize import default_palette, overlay

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPE_NAMES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")])
    model = load_checkpoint(args.checkpoint)
    names = None
    if args.classes is not None:
        classes = _parse_classes(args.classes)
        if args.open_vocab:
            names = classes
        else:
            try:
                model.set_classes(classes)
            except ValueError as exc:
                raise ValueError(f"{exc} (on the command line: --open-vocab)") from None
    elif args.open_vocab:
        raise ValueError("--open-vocab needs --classes")
    seg = Segmenter(model, device=device, dtype=dtype, mode=args.mode)
    k = len(names) if names is not None else model.num_classes
    palette = model.palette if (model.palette is not None and names is None) else default_palette(k)
    os.makedirs(args.out, exist_ok=True)
    for path in tqdm(args.images, desc="segment", unit="img", disable=len(args.images) < 2):
        image = load_image(path)
        scores = seg.open_vocab(image, names) if names is not None else seg.logits(image)
        labels = scores[0].argmax(dim=0).cpu().numpy()
        stem = os.path.splitext(os.path.basename(path))[0]
        if k <= 256:
            Image.fromarray(labels.astype(np.uint8), mode="L").save(os.path.join(args.out, f"{stem}_labels.png"))
        else:
            Image.fromarray(labels.astype(np.uint16), mode="I;16").save(os.path.join(args.out, f"{stem}_labels.png"))
        Image.fromarray(overlay(image, labels, palette)).save(os.path.join(args.out, f"{stem}_overlay.png"))
    print(f"wrote {2 * len(args.images)} files to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denseclip-fast", description="DenseCLIP semantic segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, classes and parameter counts of a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    seg = sub.add_parser("segment", help="segment images; writes NAME_labels.png and NAME_overlay.png")
    seg.add_argument("--checkpoint", required=True)
    seg.add_argument("--classes", help='comma-separated names replacing the checkpoint\'s, e.g. "sky,road,tree"')
    seg.add_argument("--open-vocab", action="store_true",
                     help="score --classes (any number) with the pixel-text map instead of the trained head")  # fmt: skip
    seg.add_argument("--mode", choices=("slide", "whole"), default="slide")
    seg.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    seg.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: bfloat16 on CUDA, float32 on CPU")
    seg.add_argument("--out", required=True, help="output directory")
    seg.add_argument("images", nargs="+", metavar="IMAGE")
    seg.set_defaults(func=cmd_segment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError) as exc:
        print(f"denseclip-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
