"""Starting a fine-tuning run from a DenseCLIP checkpoint instead of CLIP weights (``train --init DENSECLIP_FILE``):
a released ADE20K model adapted to another data set, or a run of this package's trainer continued on new data with a
fresh optimiser and schedule (``--resume`` continues the same run instead).

Every weight of the checkpoint is copied into the new model, which must be of the same architecture (the config's
structural fields: the backbone, text encoder, context decoder, neck and head widths, the activation), except:

* the class-dependent weights, when the checkpoint's classes are not the run's, name for name and in order: the
  decode head's classifier (``decode_head.conv_seg``, one output per class) and the columns of the neck's lateral
  convolution that read the score map (one input channel per class, after the backbone's channels). They keep the
  new model's initialisation: class i of another vocabulary has nothing to do with class i of this one. The
  lateral convolution's backbone columns are copied.
* the positional embeddings, resized bilinearly to the new model's grid where the architectures' input resolutions
  differ (an architecture file of another ``input_resolution``), as for CLIP weights.
* ``class_tokens``: the run's own class names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from ..model.resnet import resize_positional_grid
from .io import CheckpointError, WeightFile, read_weight_file

if TYPE_CHECKING:
    from ..model import DenseCLIP

# DenseCLIPConfig fields that decide the weights' shapes or meaning (test sizes, dropouts, tau and the like do not;
# nor does ``arch``, a name: a released file reads as 'RN50', an architecture file may say 'custom' or anything)
STRUCTURE = ("embed_dim", "fpn_channels", "head_channels", "score_concat_index", "activation")
VISION = ("kind", "layers", "width", "heads", "patch_size", "out_indices", "double_class_embedding")
CLASSIFIER = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")
POSITIONS = ("backbone.attnpool.positional_embedding", "backbone.positional_embedding")


def _differences(model: DenseCLIP, source: DenseCLIP) -> list[str]:
    """The structural config fields in which ``source``'s architecture is not ``model``'s, as 'name: a vs b'."""
    pairs = [(name, getattr(source.config, name), getattr(model.config, name)) for name in STRUCTURE]
    pairs += [(f"vision.{name}", getattr(source.config.vision, name), getattr(model.config.vision, name))
              for name in VISION]  # fmt: skip
    pairs += [(f"text.{f.name}", getattr(source.config.text, f.name), getattr(model.config.text, f.name))
              for f in dataclasses.fields(source.config.text)]  # fmt: skip
    pairs += [(f"decoder.{name}", getattr(source.config.decoder, name), getattr(model.config.decoder, name))
              for name in ("width", "heads", "layers")]  # fmt: skip
    return [f"{name}: {a!r} in the file, {b!r} here" for name, a, b in pairs if a != b]


def _read(path: str, weights: WeightFile | None) -> tuple[DenseCLIP, bool]:
    """The checkpoint's model, and whether the file names its classes (a bare state dict whose head is not
    ADE20K's 150 does not: built with placeholder names, which no run's names equal). The file is read once
    (``weights``: already read)."""
    from . import UnnamedClassesError, load_weights

    wf = read_weight_file(path) if weights is None else weights
    try:  # a file without names and 150 classes: ADE20K's, as the CLI's info says, unsaid (compared below)
        return load_weights(wf, path, None, None, warn_assumed=False), True
    except UnnamedClassesError as exc:
        return load_weights(wf, path, None, [f"class {i}" for i in range(exc.outputs)]), False


def init_from_denseclip(model: DenseCLIP, path: str | os.PathLike[str], weights: WeightFile | None = None) -> list[str]:
    """Copy a DenseCLIP checkpoint's weights into ``model`` (in place; see the module's docstring for what is not
    copied); ``weights``: the file already read (read_weight_file(path)), not read again. Returns notes for the
    user: what kept its initialisation and what was resized. Raises CheckpointError for a file of another
    architecture, naming the fields that differ."""
    path = os.fspath(path)
    source, named = _read(path, weights)
    differences = _differences(model, source)
    if differences:
        raise CheckpointError(path, "this DenseCLIP checkpoint (--init) is of another architecture than the run's "
                                    "(--arch): " + "; ".join(differences))  # fmt: skip
    same_classes = named and list(source.class_names) == list(model.class_names)
    own, given = model.state_dict(), source.state_dict()
    state: dict[str, torch.Tensor] = {}
    notes = []
    lateral = f"neck.lateral_convs.{model.config.score_concat_index}.conv.weight"
    for key, value in own.items():
        if key == "class_tokens":
            continue
        if key not in given:  # (the same architecture has the same keys: a guard, not an expected case)
            raise CheckpointError(path, f"{key} is missing from the file")
        theirs = given[key]
        if key in POSITIONS and theirs.shape != value.shape:
            old, new = source.config.vision.grid, model.config.vision.grid
            theirs = resize_positional_grid(theirs, old, (new, new)).to(value.dtype)
            notes.append(f"{key} resized from a {old}x{old} grid to {new}x{new}")
        if not same_classes and key in CLASSIFIER:
            continue
        if not same_classes and key == lateral:
            kept = value.clone()
            channels = value.shape[1] - model.num_classes  # the backbone's, before the score map's
            kept[:, :channels] = theirs[:, :channels]
            theirs = kept
        if theirs.shape != value.shape:  # (the same architecture: only what the above handles can differ)
            raise CheckpointError(path, f"{key} has shape {tuple(theirs.shape)} in the file, {tuple(value.shape)} "
                                        "here")  # fmt: skip
        state[key] = theirs
    model.load_state_dict(state, strict=False)
    if not same_classes:
        why = ("the file names no classes" if not named else
               f"its {source.num_classes} classes are not the run's {model.num_classes}, name for name")  # fmt: skip
        notes.append(f"the trained head's classifier and the score map's columns of {lateral} keep their "
                     f"initialisation ({why}); every other weight is the checkpoint's")  # fmt: skip
    return notes
