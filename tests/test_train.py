"""Training: synthetic data sets in both layouts (written here), the trainer, resume, DDP, metrics, errors."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseclip_fast import CheckpointError, load_checkpoint
from denseclip_fast.class_names import ADE20K_CLASSES
from denseclip_fast.cli import main
from denseclip_fast.preprocess import CLIP_MEAN, CLIP_STD, image_size
from denseclip_fast.train import (
    SegmentationData,
    SegmentationMetrics,
    TrainConfig,
    Trainer,
    evaluate,
    train,
    train_preset,
)
from denseclip_fast.train.data import (
    _from_hsv8,
    _to_hsv8,
    find_samples,
    photometric_distortion,
    random_crop_box,
    read_label,
    train_transform,
)
from denseclip_fast.train.loop import build_model
from denseclip_fast.train.optim import (
    freeze_text_encoder,
    learning_rate,
    make_optimizer,
    param_groups,
    segmentation_loss,
    set_learning_rates,
    short_run_warning,
)
from denseclip_fast.train.state import (
    architecture_difference,
    check_class_names,
    iteration_of,
    load_optimizer_state,
)
from denseclip_fast.train.step import (
    TrainStep,
    batchnorm_images,
    batchnorm_note,
    enable_gradient_checkpointing,
    memory_format,
    prepare_model,
)
from denseclip_fast.train.workdir import _close_copy, work_dir_lock

from .conftest import (
    LEARNING_PARTS,
    gradients_by_part,
    text_dependent_model,
    tiny_config,
    torch_threads,
    with_root_on_path,
)

CLASSES = ["sky", "grass", "road"]
COLOURS = np.array([[70, 130, 230], [40, 180, 60], [120, 120, 120]], dtype=np.float64)


def _scene(rng: np.random.Generator, size: tuple[int, int] = (40, 56)) -> tuple[np.ndarray, np.ndarray]:
    """An image of three bands (sky / grass / road) with noise, and its label."""
    h, w = size
    cuts = sorted(rng.integers(h // 5, 4 * h // 5, size=2))
    label = np.zeros((h, w), dtype=np.uint8)
    label[cuts[0] :] = 1
    label[cuts[1] :] = 2
    image = COLOURS[label] + rng.normal(0, 12, size=(h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_generic(root, n: int = 6, splits: bool = True) -> str:
    rng = np.random.default_rng(1)
    os.makedirs(root / "images"), os.makedirs(root / "labels")
    names = [f"scene_{i}" for i in range(n)]
    for name in names:
        image, label = _scene(rng)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        label[0, 0] = 255  # an ignored pixel
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    if splits:
        os.makedirs(root / "splits")
        (root / "splits" / "train.txt").write_text("\n".join(names[:-2]) + "\n")
        (root / "splits" / "val.txt").write_text("\n".join(names[-2:]) + "\n")
    return str(root)


def make_ade20k(root, n: int = 4) -> str:
    rng = np.random.default_rng(2)
    for split, count in (("training", n), ("validation", 2)):
        os.makedirs(root / "images" / split), os.makedirs(root / "annotations" / split)
        for i in range(count):
            image, label = _scene(rng)
            label = label.astype(np.uint8) * 7 + 1  # ADE classes 1, 8, 15 (0 = "other", ignored)
            label[:2] = 0
            Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return str(root)


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory) -> str:
    """A tiny ResNet DenseCLIP without dropout (so that runs compare exactly) and a small test scale."""
    config = dataclasses.replace(
        tiny_config("resnet"), head_dropout=0.0, decoder=dataclasses.replace(tiny_config().decoder, dropout=0.0),
        test_scale=(128, 64), slide_crop=64, slide_stride=43,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def _config(arch_file: str, data: str, work_dir, **overrides) -> TrainConfig:
    base = dict(arch=arch_file, data=data, layout="generic", work_dir=str(work_dir), iters=4, batch_size=2, accum=1,
                crop=48, lr=1e-3, warmup_iters=2, img_scale=(96, 48), amp="none", num_workers=0, log_interval=1,
                checkpoint_interval=2, eval_mode="whole", tensorboard=False, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _metrics(work_dir) -> list[dict[str, str]]:
    with open(os.path.join(work_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _final(work_dir, iteration: int):
    return load_checkpoint(os.path.join(work_dir, f"iter_{iteration}.safetensors"))


@pytest.fixture(scope="module")
def generic(tmp_path_factory) -> str:
    return make_generic(tmp_path_factory.mktemp("generic"))


# ------------------------------------------------------------------------------------------------ the trainer


@pytest.mark.slow
def test_training_lowers_the_loss_and_freezes_the_text_encoder(arch_file, generic, tmp_path):
    cfg = _config(arch_file, generic, tmp_path / "run", iters=60, checkpoint_interval=60, warmup_iters=0, lr=3e-3)
    result = train(cfg)
    rows = _metrics(tmp_path / "run")
    assert [int(r["iter"]) for r in rows] == list(range(1, 61)) and {"loss", "lr"} <= set(rows[0])
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
    trained, initial = _final(tmp_path / "run", 60), build_model(cfg, CLASSES)
    for name, tensor in initial.text_encoder.state_dict().items():
        assert torch.equal(trained.text_encoder.state_dict()[name], tensor), name
    assert not torch.equal(trained.contexts, initial.contexts)
    assert not torch.equal(trained.gamma, initial.gamma)
    # the decoder learns (behind gamma = 1e-4 some of its gradients start below float32's resolution of an update,
    # e.g. the cross-attention queries', so not every tensor moves within 60 steps)
    changed = [n for n, t in initial.context_decoder.state_dict().items()
               if not torch.equal(trained.context_decoder.state_dict()[n], t)]  # fmt: skip
    assert "out_proj.1.weight" in changed and len(changed) > len(initial.context_decoder.state_dict()) // 2
    assert 0 <= result["eval"]["mIoU"] <= 1 and os.path.isfile(tmp_path / "run" / "eval.csv")
    assert trained.class_names == CLASSES


def test_tensorboard_events_match_the_csv(arch_file, generic, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(_config(arch_file, generic, tmp_path / "run", iters=3, checkpoint_interval=2, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "val/mIoU", "val/aAcc", "val/mAcc"} <= set(events.Tags()["scalars"])
    rows = _metrics(tmp_path / "run")
    assert [e.step for e in events.Scalars("train/loss")] == [int(r["iter"]) for r in rows] == [1, 2, 3]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    for key in ("mIoU", "aAcc", "mAcc"):  # eval.csv's columns
        (val,) = events.Scalars(f"val/{key}")
        assert val.step == 3 and val.value == pytest.approx(result["eval"][key], rel=1e-6)
    # resumed from iteration 2 (as after a kill): the interrupted run's events after it are purged, not doubled
    train(_config(arch_file, generic, tmp_path / "run", iters=3, checkpoint_interval=2, tensorboard=True),
          resume=str(tmp_path / "run" / "iter_2.state.pt"))  # fmt: skip
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [int(r["iter"]) for r in _metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.slow
def test_resume_keeps_the_saved_sizes_left_to_the_architecture(arch_file, generic, tmp_path):
    """A run resumed with crop / img_scale left to the architecture goes on at the sizes it was saved with (they may
    have been set otherwise: another version, a preset of another arch), bit-identical to the run straight through;
    a size given explicitly is used as given."""
    train(_config(arch_file, generic, tmp_path / "a"))  # crop 48, img_scale (96, 48); the arch's are 64, (128, 64)
    left = _config(arch_file, generic, tmp_path / "b", crop=None, img_scale=None)
    train(left, resume=str(tmp_path / "a" / "iter_2.state.pt"))
    assert (left.crop, left.img_scale) == (None, None)  # the caller's config is not filled in
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (saved["crop"], saved["img_scale"]) == (48, [96, 48])
    a, b = _final(tmp_path / "a", 4).state_dict(), _final(tmp_path / "b", 4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(_config(arch_file, generic, tmp_path / "c", crop=64, img_scale=None),
          resume=str(tmp_path / "a" / "iter_2.state.pt"))  # fmt: skip
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (saved["crop"], saved["img_scale"]) == (64, [96, 48])


def test_tensorboard_missing_is_said_not_silent(arch_file, generic, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    with pytest.warns(UserWarning, match="tensorboard package is not installed"):
        train(_config(arch_file, generic, tmp_path / "run", iters=1, checkpoint_interval=1, tensorboard=True))
    assert not os.path.exists(tmp_path / "run" / "tensorboard") and len(_metrics(tmp_path / "run")) == 1


@pytest.mark.slow
def test_resume_matches_training_straight_through(arch_file, generic, tmp_path):
    """iter_2's state restores model, optimiser, schedule, random state and data position: the resumed run's
    iteration 4 is bit-identical to the uninterrupted run's (dropout included: the tiny test model has none, so a
    second, dropout-bearing run below checks the random state)."""
    straight = _config(arch_file, generic, tmp_path / "a")
    train(straight)
    resumed = _config(arch_file, generic, tmp_path / "b")
    train(resumed, resume=str(tmp_path / "a" / "iter_2.state.pt"))
    a, b = _final(tmp_path / "a", 4).state_dict(), _final(tmp_path / "b", 4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert [int(r["iter"]) for r in _metrics(tmp_path / "b")] == [3, 4]
    resumed, straight = _metrics(tmp_path / "b"), _metrics(tmp_path / "a")[2:]
    assert straight == [{**r, "images_per_s": r2["images_per_s"], "seconds": r2["seconds"]}
                        for r, r2 in zip(resumed, straight)]  # fmt: skip


def test_a_resume_with_another_lr_uses_it_and_logs_the_optimizers(arch_file, generic, tmp_path, monkeypatch, capsys):
    """Resumed with another lr, weight_decay and backbone_lr_mult, the optimizer went on with the saved ones (its
    groups' initial_lr and weight_decay came from the state) while metrics.csv, TensorBoard and config.json showed
    the new ones. This run's settings now apply from the iteration resumed at, as the schedule's other fields do
    (so "resume with a lower --lr" after a non-finite loss does what it says), the change is said on stderr, and the
    logged lr is read from the optimizer."""
    train(_config(arch_file, generic, tmp_path / "a", iters=2, checkpoint_interval=2))
    used = []

    def spy(optimizer, iteration, cfg):
        lr = set_learning_rates(optimizer, iteration, cfg)
        used.append((lr, [(g["lr"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]))
        return lr

    monkeypatch.setattr("denseclip_fast.train.loop.set_learning_rates", spy)
    capsys.readouterr()
    cfg = _config(arch_file, generic, tmp_path / "b", lr=5e-4, weight_decay=1e-2, backbone_lr_mult=0.5)
    train(cfg, resume=str(tmp_path / "a" / "iter_2.state.pt"))
    assert len(used) == 2
    for it, (logged, groups) in zip((2, 3), used):
        assert {g[1:] for g in groups} == {(5e-4, 1e-2), (5e-4, 0.0), (2.5e-4, 1e-2), (2.5e-4, 0.0)}
        assert logged == groups[0][0] == learning_rate(5e-4, it, cfg) and all(g[0] > 0 for g in groups)
    assert ("iter_2.state.pt with lr 0.0005 (the saved run had 0.001), weight_decay 0.01 (the saved run had 0.0001), "
            "backbone_lr_mult 0.5 (the saved run had 0.1), iters 4 (the saved run had 2): the optimizer and the "
            "schedule go on with these values from iteration 2") in capsys.readouterr().err  # fmt: skip
    assert [float(r["lr"]) for r in _metrics(tmp_path / "b")] == [lr for lr, _ in used]


def test_a_failed_save_leaves_the_previous_checkpoint_in_charge(arch_file, generic, tmp_path, monkeypatch):
    """A crash while writing iter_4's state (here torch.save failing after writing) leaves no partial file and
    latest.json pointing at iter_2, from which resume="auto" finishes the run (iter_4's model file, complete, is
    written again); a failed model save leaves no file."""
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(f)
        real_save(obj, f, *args, **kwargs)
        if len(calls) == 2:
            raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    cfg = _config(arch_file, generic, tmp_path / "w")
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    assert sorted(os.listdir(tmp_path / "w")) == [".lock", "config.json", "iter_2.safetensors", "iter_2.state.pt",
                                                  "iter_4.safetensors", "latest.json", "metrics.csv"]  # fmt: skip
    assert os.path.basename(calls[1]).startswith(".iter_4.state.pt.")  # written under a temporary name
    with open(tmp_path / "w" / "latest.json") as f:
        assert json.load(f)["iteration"] == 2
    monkeypatch.setattr(torch, "save", real_save)
    (tmp_path / "w" / ".iter_4.state.pt.999.0123abcd.partial").write_bytes(b"left by a killed run")
    assert train(cfg, resume="auto")["iterations"] == 4
    assert not [n for n in os.listdir(tmp_path / "w") if n.endswith(".partial")]  # removed when the run started
    # iterations 3 and 4 were logged by both runs: the resumed run's rows replace the interrupted run's
    assert [int(r["iter"]) for r in _metrics(tmp_path / "w")] == [1, 2, 3, 4]
    with open(tmp_path / "w" / "latest.json") as f:
        assert json.load(f)["state"] == "iter_4.state.pt"

    import safetensors.torch

    def write_half(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half)
    model = _final(tmp_path / "w", 4)
    with pytest.raises(CheckpointError, match="copy.safetensors: cannot save: disk quota exceeded"):
        model.save(tmp_path / "w" / "copy.safetensors")
    assert not [n for n in os.listdir(tmp_path / "w") if "copy" in n]


def test_resume_keeps_this_runs_optimizer_implementation():
    """A saved optimizer state brings its moments, not its implementation flags: load_state_dict alone would make
    a CUDA run's fused AdamW the saved (CPU, or older) one's."""
    p = torch.nn.Parameter(torch.randn(3))
    saved = torch.optim.AdamW([p], lr=0.1, foreach=True)
    p.grad = torch.ones(3)
    saved.step()
    plain = torch.optim.AdamW([p], lr=0.1, foreach=False)
    plain.load_state_dict(saved.state_dict())
    assert plain.param_groups[0]["foreach"] is True  # what load_state_dict does on its own
    mine = torch.optim.AdamW([p], lr=0.1, foreach=False)
    load_optimizer_state(mine, saved.state_dict())
    assert mine.param_groups[0]["foreach"] is False and mine.param_groups[0]["lr"] == 0.1
    assert torch.equal(mine.state[p]["exp_avg"], saved.state[p]["exp_avg"])


def test_the_cpu_optimizer_is_the_multi_tensor_adamw_with_the_defaults_numbers(arch_file, generic):
    """On the CPU make_optimizer takes AdamW's multi-tensor implementation (torch's CPU default is a loop over the
    parameters reading each step count back to the host); a few steps of both give the same weights, bit for bit."""
    from denseclip_fast.train.optim import make_optimizer

    cfg = _config(arch_file, generic, "unused", lr=1e-3, iters=10, warmup_iters=0)
    models = [build_model(cfg, CLASSES) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    default = torch.optim.AdamW(param_groups(models[1], cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    optimizers = [make_optimizer(models[0], cfg, torch.device("cpu")), default]
    assert optimizers[0].param_groups[0]["foreach"] is True and not optimizers[1].param_groups[0]["foreach"]
    before = [p.detach().clone() for p in models[0].parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone() if p.requires_grad else None
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    assert sum(not torch.equal(a, b) for a, b in zip(models[0].parameters(), before)) == len(
        [p for group in optimizers[0].param_groups for p in group["params"]])  # every trained tensor moved


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint(arch_file, generic, tmp_path, monkeypatch):
    """A NaN loss (here from iteration 3 on) stops the run at the next iteration that reads the losses (logging or
    saving: 4 here) with a FloatingPointError that names it, and no checkpoint is written from the spoilt weights."""
    import denseclip_fast.train.loop as loop

    real_loss, calls = loop.segmentation_loss, []

    def spoilt(*args, **kwargs):
        losses = real_loss(*args, **kwargs)
        calls.append(1)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) >= 3 else losses

    monkeypatch.setattr(loop, "segmentation_loss", spoilt)
    with pytest.raises(FloatingPointError, match=r"not finite at iteration 4 \(loss nan.*--resume auto"):
        train(_config(arch_file, generic, tmp_path / "w", log_interval=10))
    with open(tmp_path / "w" / "latest.json") as f:
        assert json.load(f)["iteration"] == 2
    assert not (tmp_path / "w" / "iter_4.safetensors").exists()


def test_non_finite_weights_stop_the_run_before_a_checkpoint(arch_file, generic, tmp_path, monkeypatch):
    """An update that leaves an infinity in the weights though the loss before it was finite (here the last step's)
    stops the run with a FloatingPointError naming the tensor, and no checkpoint is written from those weights."""
    import denseclip_fast.train.loop as loop

    real_optimizer = loop.make_optimizer

    def spoilt_optimizer(model, cfg, device):
        optimizer = real_optimizer(model, cfg, device)
        step, calls = optimizer.step, []

        def spoilt_step(*args, **kwargs):
            out = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 4:
                with torch.no_grad():
                    model.gamma[0] = float("inf")
            return out

        optimizer.step = spoilt_step
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", spoilt_optimizer)
    with pytest.raises(FloatingPointError, match=r"weights are not finite after iteration 4 \(1 tensor\(s\), e.g. gam"):
        train(_config(arch_file, generic, tmp_path / "w"))
    with open(tmp_path / "w" / "latest.json") as f:
        assert json.load(f)["iteration"] == 2
    assert not (tmp_path / "w" / "iter_4.safetensors").exists()


def test_numbers_out_of_range_are_refused_naming_the_field(arch_file, generic, tmp_path, capsys):
    for overrides, message in (
        ({"lr": math.inf}, "lr must be a finite number > 0 and <= 1, got inf"),
        ({"lr": math.nan}, "lr must be a finite number > 0 and <= 1, got nan"),
        ({"lr": 0.0}, "lr must be a finite number > 0 and <= 1, got 0.0"),
        ({"min_lr": -1e-6}, "min_lr must be a finite number >= 0 and <= 1, got -1e-06"),
        ({"weight_decay": math.inf}, "weight_decay must be a finite number >= 0, got inf"),
        ({"weight_decay": 1e5}, "weight_decay x lr must be <= 1, got 100000.0 x 0.001"),
        ({"warmup_ratio": 2.0}, "warmup_ratio must be a finite number >= 0 and <= 1, got 2.0"),
        ({"cat_max_ratio": -1.0}, "cat_max_ratio must be a finite number > 0 and <= 1, got -1.0"),
        ({"warmup_iters": -5}, "warmup_iters must be an int >= 0, got -5"),
        ({"seed": -5}, "seed must be an int in 0..4294967295, got -5"),
        ({"ignore_index": -1}, "ignore_index must be a label value in 0..65535 (255 for 8-bit labels, e.g. 65535"),
        ({"ratio_range": (2.0, 0.5)}, "ratio_range must be two finite numbers 0 < low <= high, got (2.0, 0.5)"),
        ({"ratio_range": (0.001, 1.0)}, "ratio_range's low end 0.001 scales img_scale (96, 48) below a pixel"),
        ({"img_scale": (0, 0)}, "img_scale must be two positive ints (long side, short side) of at most 8192, got "
                                "(0, 0)"),
        ({"img_scale": (10**22, 512)}, "img_scale must be two positive ints"),
        ({"crop": 16}, "crop must be an int >= 32 (the stride-32 level keeps a pixel), got 16"),
        ({"crop": 10**22}, "crop must be at most 8192, got 10000000000000000000000"),  # a traceback in a step
        ({"batch_size": 10**22}, "batch_size must be at most 65536, got 10000000000000000000000"),
        ({"iters": True}, "iters must be an int >= 1, got True"),
        ({"num_workers": False}, "num_workers must be an int >= 0, got False"),
        ({"init": ""}, "init (--init) must be CLIP weights, a DenseCLIP checkpoint or 'none'; '' is "
                       "empty"),  # was path_argument's
        ({"init": str(tmp_path / "RN50.pt")}, f"init (--init) must be CLIP weights, a DenseCLIP checkpoint or 'none'; "
                                              f"{str(tmp_path / 'RN50.pt')!r} does not exist"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            _config(arch_file, generic, tmp_path / "w", **overrides).validate()
    with pytest.raises(ValueError, match="RN50.pt' does not exist"):  # print-config checks a file given, as data
        _config(arch_file, generic, tmp_path / "w", init=str(tmp_path / "RN50.pt")).validate(template=True)
    base = ["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--work-dir", str(tmp_path / "w")]
    for extra, message in ((["--lr", "inf"], "lr must be a finite number > 0"), (["--seed", "-5"], "seed must be"),
                           (["--ignore-index", "-1"], "ignore_index must be a label value"),
                           (["--crop", "9999999999999999999999"], "crop must be at most 8192")):  # fmt: skip
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"denseclip-fast: error: {message}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "w")
    model, val = build_model(_config(arch_file, generic, "x"), CLASSES), SegmentationData(generic, "generic", "val")
    for scales, message in (((math.nan,), "scales must be finite ratios > 0 of the test scale, got nan"),
                            ((1.0, 0.25), "scales: 0.25 x the test scale (128, 64) leaves 16 pixels for the short "
                                          "side, under the network's 32; use ratios >= 0.5"),
                            ((1e9,), "scales: 1000000000.0 x the test scale (128, 64) makes its long side 1.28e+11 "
                                     "pixels, over 8192 (the scores of every class at that size would not fit in "
                                     "memory); use ratios <= 64")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(model, val, scales=scales)


def test_a_value_of_the_wrong_kind_in_any_field_is_refused_by_validate_naming_it(arch_file, generic, tmp_path):
    """Every field (walked from the dataclass, so a field added later is tried too) given values of the wrong kind
    for its type: validate refuses each naming the field. A review found "false" for a bool field taken as true
    (gradient checkpointing switched on, then the run's own config.json refused on resume), device 0 taken as '',
    10**6 DataLoader workers accepted, and img_scale=96 failing in the constructor with a bare TypeError."""
    import types
    import typing

    wrong: dict[typing.Any, list[typing.Any]] = {
        bool: ["false", 1, None], int: ["3", 2.5, True, None], float: ["x", True, None], str: [0, None, ["a"]],
        dict: ["notes", [1, 2]], tuple: [96, "ab", {1, 2}, None],
    }  # fmt: skip
    hints = typing.get_type_hints(TrainConfig)
    base, tried = _config(arch_file, generic, tmp_path / "w"), 0
    for spec in dataclasses.fields(TrainConfig):
        hint = hints[spec.name]
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
            typing.Union, types.UnionType) else [hint]  # fmt: skip
        (kind,) = kinds
        kind = typing.get_origin(kind) or kind
        for value in wrong[kind]:
            if value is None and type(None) in typing.get_args(hint):
                continue
            with pytest.raises(ValueError, match=re.escape(spec.name)) as caught:
                dataclasses.replace(base, **{spec.name: value}).validate()
            assert repr(value) in str(caught.value) or spec.name in ("data", "init"), (spec.name, caught.value)
            tried += 1
    assert tried > 100
    with pytest.raises(ValueError, match="num_workers must be at most 256, got 1000000"):
        _config(arch_file, generic, tmp_path / "w", num_workers=10**6).validate()
    _config(arch_file, generic, tmp_path / "w", num_workers=256, img_scale=[96, 48]).validate()


def test_paths_and_numpy_values_in_the_python_config_become_what_config_json_holds(arch_file, generic, tmp_path):
    """A pathlib.Path for data, work_dir or arch, and a numpy integer for ignore_index, passed validate() and then
    failed writing config.json mid-run (its work dir locked, config.json cut short); they are the str and int they
    stand for. So are numpy numbers and bools in the other fields and pairs (a sweep's np.float32 learning rate and
    np.int64 batch size were refused: "lr must be a finite number > 0 and <= 1, got np.float32(0.001)"). Other types
    are refused naming the field."""
    numpy_values = dict(ignore_index=np.int64(255), lr=np.float32(1e-3), batch_size=np.int64(2),
                        warmup_ratio=np.float64(1e-6), img_scale=(np.int64(96), np.uint8(48)),
                        ratio_range=(np.float32(0.5), np.float16(2.0)), tensorboard=np.False_,
                        channels_last=np.bool_(False), crop=np.int16(48))  # fmt: skip
    cfg = _config(arch_file, Path(generic), tmp_path / "w", arch=Path(arch_file), iters=1, **numpy_values)
    cfg.validate()
    assert (cfg.data, cfg.work_dir, cfg.arch) == (generic, str(tmp_path / "w"), arch_file)
    plain = {name: (tuple(v.item() for v in value) if isinstance(value, tuple) else value.item())
             for name, value in numpy_values.items()}  # fmt: skip
    assert {name: getattr(cfg, name) for name in plain} == plain
    for name in plain:
        for value in getattr(cfg, name) if name in ("img_scale", "ratio_range") else [getattr(cfg, name)]:
            assert type(value) in (int, float, bool), (name, type(value))
    train(cfg)
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["data"] == generic and saved["lr"] == float(np.float32(1e-3)) and saved["channels_last"] is False
    assert saved["img_scale"] == [96, 48] and saved["ratio_range"] == [0.5, 2.0] and saved["batch_size"] == 2
    with pytest.raises(ValueError, match=r"work_dir must be a str \(or a path\), got int: 3"):
        dataclasses.replace(cfg, work_dir=3).validate()


def test_a_resume_on_the_command_line_needs_only_the_work_dir(arch_file, generic, tmp_path, monkeypatch, capsys):
    """train --work-dir W --resume auto, from another directory, continues the run with its own settings (config.json,
    whose paths are absolute): without them it said "data must name the dataset directory", then "saved by a run
    with batch_size 2, this one has 32", and the relative --data of the first run was not found from elsewhere.
    Options given still override the saved ones (--iters)."""
    work, run_file = tmp_path / "work", tmp_path / "run.yaml"
    run_file.write_text("warmup_iters: 0\ncheckpoint_interval: 2\nimg_scale: [96, 48]\ntensorboard: false\n"
                        "eval_mode: whole\n")  # fmt: skip
    monkeypatch.chdir(os.path.dirname(generic))
    assert main(["train", str(run_file), "--arch", arch_file, "--data", os.path.basename(generic), "--layout",
                 "generic", "--iters", "2", "--batch-size", "2", "--crop", "48", "--device", "cpu", "--work-dir",
                 str(work), "--num-workers", "0", "--amp", "none", "--log-interval", "1"]) == 0  # fmt: skip
    saved = json.loads((work / "config.json").read_text())
    assert saved["data"] == generic and saved["work_dir"] == str(work) and saved["arch"] == arch_file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", "--work-dir", str(work), "--resume", "auto", "--iters", "4"]) == 0, capsys.readouterr().err
    assert [int(r["iter"]) for r in _metrics(work)] == [1, 2, 3, 4]
    assert os.path.exists(work / "iter_4.safetensors") and os.listdir(elsewhere) == []
    typo = str(tmp_path / "wrok")  # a mistyped work dir: no run there (it was told that data must name a directory)
    capsys.readouterr()
    assert main(["train", "--work-dir", typo, "--resume", "auto"]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: --resume auto: no run's config.json in {typo!r} (a run "
                                       "writes it into its work dir when it starts): give the run's --work-dir, or "
                                       "its CONFIG file, or --data and the other settings\n")  # fmt: skip
    assert main(["train", "--work-dir", "", "--print-config"]) == 2  # a template's work dir may be elsewhere, not ''
    assert capsys.readouterr().err == "denseclip-fast: error: --work-dir must name a directory, got ''\n"
    with pytest.raises(ValueError, match=r"^work_dir must name a directory, got ''$"):  # a config file's, in its words
        TrainConfig(work_dir="").validate(template=True)


def test_one_value_per_batchnorm_channel_names_the_options(arch_file, generic, tmp_path, capsys):
    """A crop that leaves one pixel at the 1/32 level with one image per step: BatchNorm's error named no option.
    The run that failed at its first step logged nothing: the next run in its work dir starts without moving its
    empty TensorBoard events and config.json to previous_logs_1/ (it said it had moved a run's logs)."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    cfg = _config(arch_file, generic, tmp_path / "w", crop=48, batch_size=2, accum=2, iters=1, tensorboard=tensorboard)
    with pytest.raises(ValueError, match=r"^crop 48 leaves one pixel at the network's 1/32 level, where BatchNorm "
                                         r"sees 1 image\(s\) per step \(batch_size 2 over 1 process\(es\) x accum 2\)"
                                         r".*use --crop 64 or more, or more images per step$"):  # fmt: skip
        train(cfg)
    capsys.readouterr()
    train(dataclasses.replace(cfg, crop=64))  # the same step with two pixels a side there
    assert "held logs" not in capsys.readouterr().err and not (tmp_path / "w" / "previous_logs_1").exists()
    with open(tmp_path / "w" / "config.json") as f:
        assert json.load(f)["crop"] == 64
    if tensorboard:
        assert len(os.listdir(tmp_path / "w" / "tensorboard")) == 1


def test_what_a_run_says_of_its_batchnorm_statistics(arch_file, generic):
    """A step whose BatchNorm sees fewer images than the batch says so and how to change it; --sync-bn in one
    process, where it does nothing, is told (it was ignored without a word)."""
    cfg = _config(arch_file, generic, "unused", batch_size=8, accum=2)
    assert batchnorm_images(cfg, 1) == 4 and "come from 4 image(s)" in batchnorm_note(cfg, 1)
    assert "--sync-bn does so under torchrun" in batchnorm_note(cfg, 1)
    assert "--sync-bn does so across these processes" in batchnorm_note(cfg, 2)
    synced = dataclasses.replace(cfg, sync_bn=True)
    assert batchnorm_images(synced, 2) == 4 and "each of accum 2 forwards is synchronised across the 2 processes" \
        in batchnorm_note(synced, 2)  # fmt: skip
    assert batchnorm_note(dataclasses.replace(synced, accum=1), 2) is None  # 4 x 2 processes: the batch of 8
    assert batchnorm_note(dataclasses.replace(cfg, accum=1), 1) is None
    alone = batchnorm_note(dataclasses.replace(synced, accum=1), 1)
    assert alone.startswith("--sync-bn synchronises BatchNorm across torchrun's processes and does nothing in one")


def test_choices_a_missing_data_set_and_bad_config_files_are_refused_naming_them(arch_file, generic, tmp_path,
                                                                                 capsys):  # fmt: skip
    """The fields that take one of a few words name the field, the choices and what came; a run without --data
    says which option names it; a config file that is no UTF-8 text or no mapping of fields names the file. An empty
    CONFIG or --resume (an unset shell variable) is refused: they were taken as none, and the default recipe, or a
    fresh run, trained."""
    for overrides, message in (
        ({"layout": "voc"}, "layout must be one of ('ade20k', 'generic'), got 'voc'"),
        ({"amp": "fp8"}, "amp must be 'bf16', 'fp16' or 'none', got 'fp8'"),
        ({"norm_decay": "some"}, "norm_decay must be 'all' or 'official', got 'some'"),
        ({"eval_mode": "tiles"}, "eval_mode must be 'whole' or 'slide', got 'tiles'"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            _config(arch_file, generic, tmp_path / "w", **overrides).validate()
    with pytest.raises(ValueError, match=re.escape("data must name the dataset directory (--data DIR)")):
        _config(arch_file, "", tmp_path / "w").validate()
    with pytest.raises(ValueError, match=re.escape("work_dir must name a directory, got ''")):
        _config(arch_file, generic, "").validate()
    _config(arch_file, "", tmp_path / "w").validate(template=True)  # print-config: a template may leave data out
    capsys.readouterr()
    short = ["--arch", arch_file, "--data", generic, "--layout", "generic", "--iters", "1", "--batch-size", "2",
             "--crop", "48", "--device", "cpu", "--num-workers", "0",
             "--work-dir", str(tmp_path / "w")]  # (a short run should the refusals go)  # fmt: skip
    assert main(["train", "", *short]) == 2
    assert capsys.readouterr().err == ("denseclip-fast: error: CONFIG must name a training config file (YAML or "
                                       "JSON), got ''\n")  # it trained the default RN50 recipe  # fmt: skip
    assert main(["train", *short, "--resume", ""]) == 2
    assert capsys.readouterr().err == ("denseclip-fast: error: --resume takes 'auto' or a training state file "
                                       "(iter_N.state.pt), got ''\n")  # it started a fresh run  # fmt: skip
    assert not os.path.exists(tmp_path / "w")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("arch: café\n".encode("latin-1"))
    listed = tmp_path / "listed.json"
    listed.write_text("[1, 2]")
    for path, message in ((latin, f"training config {str(latin)!r} is not UTF-8 text"),
                          (listed, f"{listed}: a training config must be a mapping of fields, got list")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig.load(str(path))


def test_the_config_switch_turns_gradient_checkpointing_on_and_only_it(arch_file, generic, tmp_path):
    """prepare_model wraps the backbone's stages and the text blocks when the run's config asks (the command line's
    --grad-checkpointing reaches the model through this field), and leaves every forward as it is otherwise."""
    for on in (False, True):
        cfg = _config(arch_file, generic, tmp_path / "w", grad_checkpointing=on)
        model = prepare_model(build_model(cfg, CLASSES), cfg, torch.device("cpu"))
        blocks = [getattr(model.backbone, f"layer{i}") for i in range(1, 5)]
        blocks += list(model.text_encoder.transformer.resblocks)
        assert all(isinstance(block.forward, functools.partial) == on for block in blocks), on


def test_sync_bn_under_torchrun_on_the_cpu_is_refused_naming_the_option(arch_file, generic, tmp_path, monkeypatch):
    """--sync-bn in two processes on the CPU (gloo): PyTorch's SyncBatchNorm runs on CUDA only, and the run failed
    with its "SyncBatchNorm layers only work with GPU modules", naming no option, once config.json and the lock were
    written. Two processes simulated: the launch yields rank 0 of 2 without a process group."""
    from denseclip_fast.train import loop

    @contextlib.contextmanager
    def two_processes(cfg):
        yield 0, 2, torch.device("cpu")

    monkeypatch.setattr(loop, "distributed", two_processes)
    cfg = _config(arch_file, generic, tmp_path / "w", crop=64, sync_bn=True)
    with pytest.raises(ValueError, match=r"^sync_bn \(--sync-bn\) synchronises BatchNorm across CUDA processes: "
                                         r"PyTorch's SyncBatchNorm does not run on device cpu"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "w").exists()  # refused before the work dir was made


def test_a_class_name_the_text_encoder_cannot_take_names_the_class_list(arch_file, tmp_path):
    """A classes.txt name past the class token length (3 BPE tokens in the official architectures) stopped the run
    with "class name ... has 4 BPE tokens", naming no file: eval named the data set's class list, train did not."""
    data = make_generic(tmp_path / "g", n=2, splits=False)
    (tmp_path / "g" / "classes.txt").write_text("sky\nbig traffic light pole\nroad\n")
    cfg = _config(arch_file, data, tmp_path / "w")
    with pytest.raises(ValueError, match=rf"^the data set's class list {re.escape(os.path.join(data, 'classes.txt'))}: "
                                         r"class name 'big traffic light pole' has 4 BPE tokens"):  # fmt: skip
        train(cfg)
    assert not (tmp_path / "w").exists()


def test_the_sampler_deals_every_image_to_the_ranks_and_pads_any_size():
    """Each epoch is a permutation dealt round-robin, padded (with its first images) to a multiple of the processes;
    with more processes than twice the images the padding ran out (IndexError). Resuming skips what was seen."""
    from itertools import islice

    from denseclip_fast.train.data import TrainSampler

    for size, world in ((6, 1), (6, 4), (1, 4), (2, 7), (5, 5)):
        per_rank = -(-size // world)
        streams = [list(islice(TrainSampler(size, 3, rank, world), max(2 * per_rank, 7))) for rank in range(world)]
        for epoch in range(2):
            dealt = [index for stream in streams for index, _ in stream[epoch * per_rank : (epoch + 1) * per_rank]]
            assert len(dealt) == per_rank * world and set(dealt) == set(range(size)), (size, world, dealt)
        positions = sorted(position for stream in streams for _, position in stream[: 2 * per_rank])
        assert positions == list(range(2 * per_rank * world))
        for rank in range(world):  # a resume after k samples of this rank's stream goes on where it was
            assert list(islice(TrainSampler(size, 3, rank, world, start=3), 4)) == streams[rank][3:7]


def test_scales_advice_passes_and_ints_past_float_are_refused():
    """The smallest ratio the message advises is rounded up, so following it works; an int too large for a float
    is a ValueError, not an OverflowError from math.isfinite."""
    from denseclip_fast.train.evaluate import check_scales

    with pytest.raises(ValueError, match=r"leaves 31 pixels .* use ratios >= 0\.0534$"):
        check_scales([0.05333], (2048, 600))
    assert check_scales([0.0534], (2048, 600)) == [0.0534]
    with pytest.raises(ValueError, match="scales must be finite ratios > 0 of the test scale, got 1"):
        check_scales([2**1100], (2048, 600))
    # a number or a string is no sequence of ratios (a string's would be its digits), nor a mapping (its keys)
    for scales in ([], "1.0", 1.0, {1.0: 1}):
        with pytest.raises(ValueError, match=re.escape(f"scales must be a non-empty sequence of ratios of the test "
                                                       f"scale, e.g. (0.5, 1.0), got {scales!r}")):  # fmt: skip
            check_scales(scales, (2048, 600))


def test_flip_and_scales_average_the_probabilities_they_name():
    """Evaluation's test-time augmentation: with flip, the mean of the image's probabilities and those of its mirror
    image mirrored back; with several scales, the mean of each scale's (which differ: each scale is its own). On a
    model whose outputs vary over the image (a flipped prediction not mirrored back is 0.04 off)."""
    from denseclip_fast.train.evaluate import predict_probabilities

    model = text_dependent_model()
    image = np.random.default_rng(0).integers(0, 256, size=(37, 51, 3), dtype=np.uint8)
    with torch.no_grad():
        plain = predict_probabilities(model, image)
        mirrored = predict_probabilities(model, np.ascontiguousarray(image[:, ::-1])).flip(-1)
        assert (plain - mirrored).abs().max() > 0.02  # the model is not symmetric: the check below can fail
        torch.testing.assert_close(predict_probabilities(model, image, flip=True), (plain + mirrored) / 2,
                                   rtol=0, atol=1e-6)  # fmt: skip
        half, whole = (predict_probabilities(model, image, mode="whole", scales=(r,)) for r in (0.5, 1.0))
        assert (half - whole).abs().max() > 0.02
        torch.testing.assert_close(predict_probabilities(model, image, mode="whole", scales=(0.5, 1.0)),
                                   (half + whole) / 2, rtol=0, atol=1e-6)  # fmt: skip
        assert torch.allclose(plain.sum(0), torch.ones(37, 51))


def test_flip_resizes_the_flipped_logits_before_mirroring_the_probabilities_back():
    """As mmseg's inference (DenseCLIP's ``inference``/``aug_test``): each flipped pass's logits are resized to the
    image's size, softmaxed, and the probabilities mirrored back, then the passes averaged. Mirroring the logits
    before the resize samples them at other (float32-rounded) positions, up to 1e-5 off: about one pixel's argmax an
    image (375 x 500 from 512 x 683 logits). Bit-exact here, in mmseg's order."""
    import torch.nn.functional as F

    from denseclip_fast.preprocess import prepare
    from denseclip_fast.train.evaluate import predict_probabilities

    model = text_dependent_model()
    image = np.random.default_rng(1).integers(0, 256, size=(37, 51, 3), dtype=np.uint8)

    def mmseg_pass(x: torch.Tensor, flipped: bool) -> torch.Tensor:
        logits = F.interpolate(model(x.flip(-1) if flipped else x), size=(37, 51), mode="bilinear",
                               align_corners=False)  # fmt: skip
        probs = logits.softmax(dim=1)[0]
        return probs.flip(-1) if flipped else probs

    # MultiScaleFlipAug's scale for a ratio truncates: (int(128 * 1.37), int(64 * 1.37)) = (175, 87), which
    # rescale_size fits as (int(37 * 87 / 37 + 0.5), int(51 * 87 / 37 + 0.5)) = (87, 120) (a rounded scale: 88 x 121)
    sizes = {1.0: (64, 88), 1.37: (87, 120)}
    with torch.no_grad():
        total = torch.zeros(model.num_classes, 37, 51)
        for ratio, size in sizes.items():
            x = prepare(image, [int(s * ratio) for s in model.config.test_scale])
            assert x.shape[2:] == size
            for flipped in (False, True):
                total += mmseg_pass(x, flipped)
        found = predict_probabilities(model, image, mode="whole", scales=tuple(sizes), flip=True)
        assert torch.equal(found, total / 4)


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-9), (torch.float32, 1e-2)])
def test_channels_last_gives_the_gradients_of_nchw(arch_file, generic, tmp_path, dtype, bound):
    """One training step's gradients with channels_last images and weights equal NCHW's: in float64 to 3e-13 (the
    same function), in float32 up to summation order, which this tiny model's training-mode BatchNorms (batch
    statistics of 2 x 12 x 12 values) amplify: 1.2e-4 with torch 2.14 and 2.2e-3 with torch 2.11 (the GPU machine's)
    for this seed's model. A layout mixed up anywhere is off by O(1). What the trajectories below differ by is Adam
    amplifying that noise in near-zero gradients, not another function."""
    x, label = torch.randn(2, 3, 48, 48, dtype=dtype), torch.randint(0, 3, (2, 48, 48))
    grads = []
    for channels_last in (False, True):
        cfg = _config(arch_file, generic, tmp_path, channels_last=channels_last)
        model = prepare_model(build_model(cfg, CLASSES), cfg, torch.device("cpu")).train().to(dtype)
        logits, aux = TrainStep(model)(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        assert logits.dtype == dtype and model.backbone.conv1.weight.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        segmentation_loss(logits, aux, label, cfg)["loss"].backward()
        grads.append({n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None})
    nchw, nhwc = grads
    assert nchw.keys() == nhwc.keys() and len(nchw) > 50
    diff = sum((nchw[k] - nhwc[k]).square().sum() for k in nchw) ** 0.5
    assert diff / sum(g.square().sum() for g in nchw.values()) ** 0.5 < bound


@pytest.mark.slow
def test_channels_last_training_matches_nchw_and_resumes(arch_file, generic, tmp_path):
    """channels_last (the default on CUDA, forced here on the CPU): the same losses and weights as NCHW up to
    summation order, NHWC weights while training, and a resumed channels_last run bit-identical to one straight
    through (the checkpoints hold plain tensors)."""
    train(_config(arch_file, generic, tmp_path / "nchw", channels_last=False))
    train(_config(arch_file, generic, tmp_path / "nhwc", channels_last=True))
    losses = [[float(r["loss"]) for r in _metrics(tmp_path / run)] for run in ("nchw", "nhwc")]
    # summation-order noise, grown by three Adam steps (at the fourth loss 1.4e-4 observed with torch 2.14, 8.9e-4
    # with torch 2.11, the GPU machine's; conv_seg at PyTorch's default initialisation)
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=2e-3)
    a, b = _final(tmp_path / "nchw", 4).state_dict(), _final(tmp_path / "nhwc", 4).state_dict()
    # over all tensors at once: Adam turns summation-order noise in near-zero gradients (biases of ~1e-11, the
    # context decoder's q/k projections at 1e-15) into lr-sized steps, so single tiny tensors differ relatively much
    # (2e-4 over all of them observed with torch 2.14, 3.2e-3 with torch 2.11, whose CPU convolutions take other
    # paths per layout; the gradients of one step agree to 6e-5 with either: the test below)
    keys = [k for k in a if a[k].is_floating_point()]
    diff = sum((a[k].double() - b[k].double()).square().sum() for k in keys) ** 0.5
    assert diff / sum(a[k].double().square().sum() for k in keys) ** 0.5 < 1e-2
    train(_config(arch_file, generic, tmp_path / "resumed", channels_last=True),
          resume=str(tmp_path / "nhwc" / "iter_2.state.pt"))  # fmt: skip
    c = _final(tmp_path / "resumed", 4).state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b), [k for k in b if not torch.equal(b[k], c[k])][:5]
    cfg = _config(arch_file, generic, tmp_path, channels_last=True)
    model = prepare_model(build_model(cfg, CLASSES), cfg, torch.device("cpu"))
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert memory_format(TrainConfig(), torch.device("cpu")) == torch.contiguous_format
    assert memory_format(TrainConfig(), torch.device("cuda")) == torch.channels_last
    for wrong in ("yes", 1):  # (np.False_ is stored as False: test_paths_and_numpy_values_...)
        with pytest.raises(ValueError, match=re.escape(f"channels_last must be true, false or null (on CUDA only), "
                                                       f"got {wrong!r}")):  # fmt: skip
            _config(arch_file, generic, tmp_path, channels_last=wrong).validate()


@pytest.mark.slow
def test_resume_restores_the_random_state(generic, tmp_path):
    """With dropout (the default decoder/head dropout 0.1) resuming still reproduces the run."""
    arch = tiny_config("resnet")
    path = tmp_path / "drop.json"
    path.write_text(json.dumps(dataclasses.replace(arch, test_scale=(128, 64)).to_dict()))
    train(_config(str(path), generic, tmp_path / "a"))
    os.makedirs(tmp_path / "b")
    for name in ("iter_2.safetensors", "iter_2.state.pt"):
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    (tmp_path / "b" / "latest.json").write_text(json.dumps({"iteration": 2, "model": "iter_2.safetensors",
                                                           "state": "iter_2.state.pt"}))  # fmt: skip
    train(_config(str(path), generic, tmp_path / "b"), resume="auto")
    a, b = _final(tmp_path / "a", 4).state_dict(), _final(tmp_path / "b", 4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    """One torchrun-style process; it saves the model's buffers as each evaluation sees them (evaluated_N.pt)."""
    from denseclip_fast.train import loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    real = loop.evaluate

    def evaluate(model, *args, **kwargs):
        seen = {k: v.clone() for k, v in model.named_buffers()}
        torch.save(seen, os.path.join(cfg_dict["work_dir"], f"evaluated_{rank}.pt"))
        return real(model, *args, **kwargs)

    loop.evaluate = evaluate
    train(TrainConfig(**cfg_dict))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(arch_file, generic, tmp_path):
    """torchrun-style DDP (gloo, CPU): 2 processes x 1 image == 1 process x 2 micro-batches of 1 image, the same
    images in the same order. All runs use one thread: the tiny model's BatchNorms see 2x2 maps of one image, whose
    gradients are ill-conditioned enough that a different summation order (thread count) shows up at 1e-1."""
    import torch.multiprocessing as mp

    with torch_threads(1):
        train(_config(arch_file, generic, tmp_path / "single", accum=2, crop=64))  # BN needs > 1 value per channel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = _config(arch_file, generic, tmp_path / "ddp", crop=64)
    mp.start_processes(_ddp_worker, args=(2, port, dataclasses.asdict(ddp)), nprocs=2, start_method="spawn")
    a, b = _final(tmp_path / "single", 4), _final(tmp_path / "ddp", 4)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), (name, (p - q).abs().max().item())
    state = torch.load(tmp_path / "ddp" / "iter_4.state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["cpu"], state["rng"][1]["cpu"])  # per process
    single_losses = [float(r["loss"]) for r in _metrics(tmp_path / "single")]
    ddp_losses = [float(r["loss"]) for r in _metrics(tmp_path / "ddp")]  # the mean over both processes
    assert np.allclose(single_losses, ddp_losses, rtol=1e-6), (single_losses, ddp_losses)
    # the evaluation, its images shared by the processes, is the saved model's: each process evaluated with rank
    # 0's BatchNorm statistics, the saved ones (process 1's had moved with its own last batch, a review's finding)
    seen = [torch.load(tmp_path / "ddp" / f"evaluated_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert seen[0].keys() == seen[1].keys() and any("running_mean" in k for k in seen[0])
    for name, buffer in b.named_buffers():
        assert torch.equal(seen[0][name], buffer) and torch.equal(seen[1][name], buffer), name


@pytest.mark.slow
def test_ade20k_layout_through_the_command_line(arch_file, tmp_path, capsys):
    data = make_ade20k(tmp_path / "ade")
    train_set = SegmentationData(data, "ade20k", "train")
    assert train_set.class_names == list(ADE20K_CLASSES) and len(train_set) == 4
    _, label = train_set.read(0)
    assert set(np.unique(label)) <= {0, 7, 14, 255} and (label[:2] == 255).all()  # 0 ignored, k -> k - 1
    work, run_file = tmp_path / "work", tmp_path / "run.yaml"
    run_file.write_text("warmup_iters: 0\ncheckpoint_interval: 30\nimg_scale: [96, 48]\ntensorboard: false\n")
    assert main(["train", str(run_file), "--arch", arch_file, "--data", data, "--layout", "ade20k", "--init", "none",
                 "--iters", "30", "--batch-size", "2", "--crop", "48", "--lr", "3e-3", "--seed", "3",
                 "--device", "cpu", "--work-dir", str(work), "--num-workers", "0", "--amp", "none",
                 "--log-interval", "1"]) == 0  # fmt: skip
    final = json.loads((work / "eval_iter_30.json").read_text())  # the end of training says the final evaluation
    assert f"mIoU {100 * final['mIoU']:.2f}  aAcc {100 * final['aAcc']:.2f}  mAcc {100 * final['mAcc']:.2f}  (work " \
           f"dir {work})" in capsys.readouterr().out  # fmt: skip
    rows = _metrics(work)
    assert [int(r["iter"]) for r in rows] == list(range(1, 31))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses  # the ADE20K layout trains too
    assert json.loads((work / "config.json").read_text())["seed"] == 3
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(work / "iter_30.safetensors"), "--data", data, "--layout", "ade20k",
                 "--mode", "slide", "--scales", "0.75,1.0", "--flip", "--device", "cpu",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"mIoU {100 * result['mIoU']:.2f}  aAcc {100 * result['aAcc']:.2f}  mAcc {100 * result['mAcc']:.2f}  (2 " \
           "images, slide;" in printed and result["images"] == 2 and result["flip"]  # fmt: skip
    assert 0 <= result["aAcc"] <= 1 and len(result["per_class"]) == 150


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_gradient_checkpointing_keeps_loss_and_gradients(kind, generic, tmp_path):
    config = dataclasses.replace(
        tiny_config(kind), head_dropout=0.0, decoder=dataclasses.replace(tiny_config().decoder, dropout=0.0)
    )
    (tmp_path / "arch.json").write_text(json.dumps(config.to_dict()))
    cfg = _config(str(tmp_path / "arch.json"), generic, "unused")
    x = torch.randn(2, 3, 48, 48)
    label = torch.randint(0, 3, (2, 48, 48))
    grads = []
    for checkpointing in (False, True):
        model = build_model(cfg, CLASSES).train()
        freeze_text_encoder(model)
        if checkpointing:
            assert enable_gradient_checkpointing(model) > 0
        out = model.forward_features(x)
        loss = segmentation_loss(out["logits"], out["aux_logits"], label, cfg)["loss"]
        loss.backward()
        # and the BatchNorm statistics move once: the recomputation in the backward runs the blocks a second time
        stats = [v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k]
        grads.append((loss.detach(), model.contexts.grad.clone(), model.backbone.conv1.weight.grad.clone(), *stats))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_gradient_checkpointing_wraps_every_stage_and_block(kind):
    """enable_gradient_checkpointing recomputes each of the ResNet's four stages (or each of ViT's blocks) and each
    text encoder block: the loss and gradients above are the same whichever it wraps, so a stage left out (range(1,
    4) for the four stages) kept its activations unseen, the memory the option is there to save."""
    from denseclip_fast.model import DenseCLIP

    model = DenseCLIP(tiny_config(kind), CLASSES)
    backbone = model.backbone
    blocks = ([getattr(backbone, f"layer{i}") for i in range(1, 5)] if kind == "resnet"
              else list(backbone.transformer.resblocks))  # fmt: skip
    blocks += list(model.text_encoder.transformer.resblocks)
    assert enable_gradient_checkpointing(model) == len(blocks)
    assert all(isinstance(block.forward, functools.partial) for block in blocks)


def test_the_loss_of_channels_last_logits_is_that_of_nchw_ones():
    """segmentation_loss's cross-entropy over channels_last logits (read as a (pixels, classes) matrix, no NCHW copy)
    is mmseg's: -log softmax at the label, 0 where ignored, the mean over every pixel (written out here in float64),
    and its gradient that of NCHW logits, channels_last as the logits; a label of the wrong shape still gets torch's
    error, not a reshape that fits."""
    from denseclip_fast.train import optim

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    label = torch.randint(0, 5, (2, 6, 7), generator=g)
    label[0, 1, :3] = 255
    logp = logits.log_softmax(1)
    picked = logp.gather(1, label.clamp_max(4)[:, None])[:, 0]
    want = (-picked * (label != 255)).mean()
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = logits.float().contiguous(memory_format=fmt).requires_grad_()
        loss = optim._mean_cross_entropy(x, label, 255)
        loss.backward()
        assert x.grad.is_contiguous(memory_format=fmt)
        results.append((loss, x.grad))
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-9)
    assert optim._pixel_rows(logits.contiguous(memory_format=torch.channels_last), label)
    with pytest.raises((RuntimeError, ValueError)):
        optim._mean_cross_entropy(logits.float().contiguous(memory_format=torch.channels_last),
                                  label.transpose(1, 2).contiguous(), 255)  # fmt: skip


def test_the_loss_is_mmsegs_decode_head_plus_identity_head():
    """segmentation_loss against mmseg 0.19's BaseDecodeHead.losses written out in float64: the head's logits and
    the identity head's input (score / tau) each resized to the label (bilinear, align_corners=False), their
    cross-entropy with ignore index 255 averaged over every pixel, ignored ones included (0.19 has no
    avg_non_ignore), the identity head's weighted 0.4, the two summed; logits at the label's size are not resized."""
    import torch.nn.functional as F

    cfg = TrainConfig()
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 8, 10, generator=g, dtype=torch.float64)  # the head's 1/4
    aux = torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64) / 0.07  # the score map's 1/32 (of 32 x 40)
    label = torch.randint(0, 6, (2, 32, 40), generator=g)
    label[0, :9] = 255
    label[1, :, 30:] = 255

    def mmseg(x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, size=label.shape[1:], mode="bilinear", align_corners=False)
        return F.cross_entropy(up, label, ignore_index=255, reduction="none").sum() / label.numel()

    got = segmentation_loss(logits.float(), aux.float(), label, cfg)
    want = {"loss_decode": mmseg(logits), "loss_aux": mmseg(aux)}
    want["loss"] = want["loss_decode"] + 0.4 * want["loss_aux"]
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=0, msg=name)
    at_size = torch.randn(2, 6, 32, 40, generator=g, dtype=torch.float64)
    at_size_got = segmentation_loss(at_size.float(), aux.float(), label, cfg)["loss_decode"]
    plain = F.cross_entropy(at_size, label, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(at_size_got.double(), plain, rtol=1e-5, atol=0)


def test_train_step_leaves_the_upsampling_to_the_float32_loss(arch_file, generic):
    """TrainStep returns the head's logits at 1/4 of the input (the loss upsamples them in float32, as mmseg's
    force_fp32 losses); in float32 its loss equals that of the model's full-size forward."""
    cfg = _config(arch_file, generic, "unused")
    model = build_model(cfg, CLASSES).eval()  # no dropout: both forwards see the same function
    x, label = torch.randn(2, 3, 32, 48), torch.randint(0, 3, (2, 32, 48))
    logits, aux = TrainStep(model)(x)
    assert logits.shape == (2, len(CLASSES), 8, 12) and aux.shape[-2:] == model.extract(x).local_feat.shape[-2:]
    out = model.forward_features(x)
    ours, full = (segmentation_loss(a, b, label, cfg) for a, b in ((logits, aux), (out["logits"], out["aux_logits"])))
    for name in ("loss", "loss_decode", "loss_aux"):
        assert torch.allclose(ours[name], full[name], rtol=1e-6, atol=0), name


def test_a_bf16_autocast_step(arch_file, generic, monkeypatch):
    """The trainer's default: forward under bf16 autocast through the fused operators, backward, finite gradients
    (the C++ attention once received a bfloat16 log-sum-exp from autocast and refused it), each learning part's
    gradient within 0.15 of the same step on the reference backend: bf16 noise alone is 0.01-0.05 per part, a part
    whose gradient went missing (contexts, gamma, the context decoder: a few percent of all the gradients) is 1."""
    cfg = _config(arch_file, generic, "unused", amp="bf16")
    x, label = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    grads = {}
    for backend in ("cpu", "reference"):
        monkeypatch.setenv("DENSECLIP_FAST_BACKEND", backend)
        torch.manual_seed(0)
        model = build_model(cfg, CLASSES).train()
        freeze_text_encoder(model)
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features(x)
        assert out["logits"].dtype == torch.bfloat16
        segmentation_loss(out["logits"], out["aux_logits"], label, cfg)["loss"].backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("text_encoder."))
        grads[backend] = gradients_by_part(model)
    for group in LEARNING_PARTS:
        fused, reference = grads["cpu"][group], grads["reference"][group]
        assert torch.isfinite(fused).all() and reference.norm() > 0, group
        assert (fused - reference).norm() <= 0.15 * reference.norm(), group


# ------------------------------------------------------------------------------------------------ recipe pieces


def test_parameter_groups_and_schedule(arch_file, generic):
    cfg = _config(arch_file, generic, "unused", lr=1e-4, iters=80_000, warmup_iters=1500, min_lr=1e-6)
    model = build_model(cfg, CLASSES)
    freeze_text_encoder(model)
    groups = param_groups(model, cfg)
    names = {n: g for g in groups for n in g["names"]}
    assert not any(n.startswith("text_encoder.") for n in names)
    assert {"contexts", "gamma"} <= set(names)
    assert names["backbone.conv1.weight"]["lr"] == pytest.approx(1e-5)
    assert names["decode_head.conv_seg.weight"]["lr"] == pytest.approx(1e-4)
    norms = [n for n in names if ".bn" in n or "norm" in n or ".ln" in n]
    assert norms and all(names[n]["weight_decay"] == 0 for n in norms)
    assert names["decode_head.conv_seg.weight"]["weight_decay"] == 1e-4
    official = {n for g in param_groups(model, dataclasses.replace(cfg, norm_decay="official")) for n in g["names"]
                if g["weight_decay"] == 0}  # fmt: skip
    assert official and all(n.startswith("context_decoder.decoder.") and ".norm" in n for n in official)
    assert learning_rate(1e-4, 0, cfg) == pytest.approx(1e-4 * 1e-6, rel=1e-3)  # warm-up starts at ratio x lr
    assert learning_rate(1e-4, 1500, cfg) == pytest.approx((1e-4 - 1e-6) * (1 - 1500 / 80_000) ** 0.9 + 1e-6)
    assert learning_rate(1e-4, 80_000, cfg) == pytest.approx(1e-6)
    assert train_preset("RN50").batch_size == 32


@pytest.mark.parametrize("arch", ["RN50", "RN101", "ViT-B/16"])
def test_the_presets_are_the_official_configs(arch):
    """train_preset's numbers are DenseCLIP's segmentation/configs/denseclip_fpn_{res50,res101}_512x512_80k.py and
    denseclip_fpn_vit-b_640x640_80k.py (with their _base_ ade20k_clip(_640).py, schedule_80k.py, denseclip_r50.py):
    AdamW 1e-4 / 1e-4, backbone lr_mult 0.1, poly 0.9 to 1e-6 after 1500 linear warm-up iterations from 1e-6,
    80k iterations of 8 x 4 images, Resize (2048, 512 or 640) x [0.5, 2], RandomCrop 512 or 640 with
    cat_max_ratio 0.75, ignore 255, the identity head's loss weight 0.4 on score / tau 0.07, the decode head's and
    the context decoder's dropout 0.1, ViT-B/16's drop path 0.1 (none in the ResNets)."""
    cfg = train_preset(arch)
    cfg.apply_arch_defaults()
    side = 640 if arch == "ViT-B/16" else 512
    assert (cfg.lr, cfg.weight_decay, cfg.backbone_lr_mult) == (1e-4, 1e-4, 0.1)
    assert (cfg.poly_power, cfg.min_lr, cfg.warmup_iters, cfg.warmup_ratio) == (0.9, 1e-6, 1500, 1e-6)
    assert (cfg.iters, cfg.batch_size, cfg.checkpoint_interval) == (80_000, 32, 8000)
    assert (cfg.crop, cfg.img_scale, cfg.ratio_range, cfg.cat_max_ratio) == (side, (2048, side), (0.5, 2.0), 0.75)
    assert (cfg.aux_weight, cfg.ignore_index, cfg.layout) == (0.4, 255, "ade20k")
    model = cfg.model_config()
    assert (model.tau, model.head_dropout, model.decoder.dropout) == (0.07, 0.1, 0.1)
    assert model.vision.drop_path_rate == (0.1 if arch == "ViT-B/16" else 0.0)


def test_the_schedule_is_mmcvs_poly_after_a_linear_warm_up():
    """mmcv's PolyLrUpdaterHook(power 0.9, min_lr 1e-6, by_epoch False, warmup 'linear', warmup_iters 1500,
    warmup_ratio 1e-6), written out here: before iteration i (0-based: runner.iter before the step) each group's
    poly rate (base - min_lr) (1 - i / iters)^0.9 + min_lr, times 1 - (1 - i / 1500)(1 - 1e-6) while i < 1500. The
    warm-up multiplies that iteration's poly rate, not the base (at i = 750 they differ by 0.8%), and the first step
    takes lr x 1e-6 (an index off by one would take 1500 times that)."""
    cfg = TrainConfig(iters=80_000)

    def mmcv(base: float, i: int) -> float:
        regular = (base - 1e-6) * (1 - i / 80_000) ** 0.9 + 1e-6
        return regular * (1 - (1 - i / 1500) * (1 - 1e-6)) if i < 1500 else regular

    for base in (1e-4, 1e-5):  # the head's and the backbone's (lr_mult 0.1)
        for i in (0, 1, 2, 750, 1499, 1500, 1501, 40_000, 79_999):
            assert learning_rate(base, i, cfg) == pytest.approx(mmcv(base, i), rel=1e-12, abs=0), (base, i)
    on_base = 1e-4 * (1 - (1 - 750 / 1500) * (1 - 1e-6))
    assert learning_rate(1e-4, 750, cfg) < 0.995 * on_base


def test_parameter_groups_are_mmcvs_custom_keys(arch_file, generic):
    """DefaultOptimizerConstructor with the official paramwise_cfg, written out here: custom keys tried longest
    first ('text_encoder' lr x 0, 'backbone' lr x 0.1, 'norm' weight decay x 0), the first that is a substring of the
    parameter's name wins. norm_decay="official" gives every trained parameter that lr and weight decay; the default
    differs only in that every normalisation layer's weight and bias (BatchNorm, LayerNorm, GroupNorm) has none,
    as the recipe says (README, Training). The text encoder is left out (frozen; mmcv gave it lr x 0)."""
    cfg = _config(arch_file, generic, "unused", lr=1e-4, weight_decay=1e-4, backbone_lr_mult=0.1)
    model = build_model(cfg, CLASSES)
    freeze_text_encoder(model)
    keys = {"text_encoder": (0.0, 1.0), "backbone": (0.1, 1.0), "norm": (1.0, 0.0)}  # (lr_mult, decay_mult)

    def mmcv(name: str) -> tuple[float, float]:
        for key in sorted(sorted(keys), key=len, reverse=True):
            if key in name:
                return 1e-4 * keys[key][0], 1e-4 * keys[key][1]
        return 1e-4, 1e-4

    kinds = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    norms = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, kinds)
             for n, _ in module.named_parameters(recurse=False)}  # fmt: skip
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and norms and all(not n.startswith("text_encoder.") for n in trained)
    for mode in ("official", "all"):
        got = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, dataclasses.replace(cfg, norm_decay=mode))
               for n in g["names"]}  # fmt: skip
        assert sorted(got) == sorted(trained), mode
        for name in trained:
            lr, decay = mmcv(name)
            decay = 0.0 if mode == "all" and name in norms else decay
            assert got[name] == pytest.approx((lr, decay), rel=1e-12), (mode, name)


def test_vit_group_norms_get_no_weight_decay():
    """The default norm_decay exempts GroupNorm too (module docstring, README): ViT-B/16's pyramid normalises its
    token maps with GroupNorms (backbone.fpn1.0, fpn2.0, fpn3, fpn4.0), which the ResNet of the tests above lacks,
    so a NORMS tuple without nn.GroupNorm decayed them unseen. Each is in a backbone group (lr x 0.1) without
    decay; the patch embedding's convolution beside them keeps its decay."""
    from denseclip_fast.model import DenseCLIP

    model = DenseCLIP(tiny_config("vit"), CLASSES)
    freeze_text_encoder(model)
    groups = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, TrainConfig()) for n in g["names"]}
    norms = [f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, torch.nn.GroupNorm)
             for p in ("weight", "bias")]  # fmt: skip
    assert len(norms) == 8 and all(n.startswith("backbone.fpn") for n in norms)
    assert all(groups[n] == pytest.approx((1e-5, 0.0)) for n in norms), {n: groups[n] for n in norms}
    assert groups["backbone.conv1.weight"] == pytest.approx((1e-5, 1e-4))


def test_a_group_under_min_lr_never_rises_above_its_base(arch_file, generic):
    """mmcv's poly schedule raises a group whose base is under min_lr up to min_lr: the official recipe's lr_mult 0
    moved its "frozen" text encoder so, and backbone_lr_mult 0 here moved the backbone. The floor is the smaller of
    min_lr and the base."""
    cfg = _config(arch_file, generic, "unused", lr=1e-4, iters=1000, warmup_iters=10, min_lr=1e-6,
                  backbone_lr_mult=0.0)  # fmt: skip
    model = build_model(cfg, CLASSES)
    freeze_text_encoder(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    for iteration in (0, 5, 10, 500, 999, 1000):
        set_learning_rates(optimizer, iteration, cfg)
        rates = {g["names"][0].startswith("backbone."): g["lr"] for g in optimizer.param_groups}
        assert rates[True] == 0.0 and rates[False] > 0
    small = 5e-7  # a base under min_lr: decays towards itself, i.e. stays at it after the warm-up
    assert learning_rate(small, 500, cfg) == pytest.approx(small) and learning_rate(small, 1000, cfg) == small


def test_a_warm_up_that_keeps_the_rate_low_is_said(arch_file, generic, tmp_path, capsys):
    """A preset's 1500 warm-up iterations with --iters 200: the rate peaks at 4% of lr (poly decays it before the
    warm-up ends). The run says so on stderr; a run whose rate reaches half of lr says nothing."""
    long = _config(arch_file, generic, "unused", lr=1e-4, iters=200, warmup_iters=1500, min_lr=1e-6)
    peak = max(learning_rate(1e-4, it, long) for it in range(200))
    assert peak < 0.05e-4
    assert f"peaks at 4% of lr ({peak:.3g})" in short_run_warning(long)
    assert short_run_warning(dataclasses.replace(long, iters=80_000)) is None  # the recipe: 98%
    assert short_run_warning(dataclasses.replace(long, warmup_iters=0)) is None
    assert short_run_warning(dataclasses.replace(long, iters=1500)) is not None  # 27%
    assert short_run_warning(dataclasses.replace(long, iters=3000, warmup_iters=1500)) is None
    short = _config(arch_file, generic, tmp_path / "run", iters=2, warmup_iters=5, checkpoint_interval=1)
    train(short)
    err = capsys.readouterr().err
    assert f"denseclip-fast train: warning: {short_run_warning(short)}\n" in err and "warmup_iters 5 and iters 2" in err
    assert "(--warmup-iters N, or warmup_iters in the config file; 0 for none)" in err
    # said once per run: not again on resuming it, again when the resumed run's schedule is another
    train(short, resume=str(tmp_path / "run" / "iter_1.state.pt"))
    assert "learning rate peaks" not in capsys.readouterr().err
    longer = dataclasses.replace(short, iters=3)
    train(longer, resume=str(tmp_path / "run" / "iter_1.state.pt"))
    assert f"denseclip-fast train: warning: {short_run_warning(longer)}\n" in capsys.readouterr().err
    train(_config(arch_file, generic, tmp_path / "other", iters=1, warmup_iters=0, checkpoint_interval=1))
    assert "warning" not in capsys.readouterr().err
    # a run its data set refuses says that alone: the warning comes once the data is checked
    data = shutil.copytree(generic, tmp_path / "data")  # (the fixture's data set is shared)
    (data / "classes.txt").write_text("wall\nbig traffic light pole\n")
    with pytest.raises(ValueError, match="has 4 BPE tokens"):
        train(dataclasses.replace(short, data=str(data), work_dir=str(tmp_path / "refused")))
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("how", ["preset", "constructor", "file", "file_and_option", "preset_file_and_option"])
def test_crop_and_scale_follow_the_architecture_unless_given(how, tmp_path, capsys):
    """ViT-B/16 trains at 640 / (2048, 640), the ResNets at 512 / (2048, 512), however the arch was chosen: a
    config made for one arch and switched to ViT-B/16 (--arch over a file) used to keep 512 / (2048, 512) silently.
    A crop or scale that was given stays."""
    path = tmp_path / "run.yaml"
    if how == "preset":
        cfg = train_preset("ViT-B/16")
    elif how == "constructor":
        cfg = TrainConfig(arch="ViT-B/16")
    else:
        path.write_text(("preset: RN50\n" if how.startswith("preset") else "") + ("" if "option" in how else
                        "arch: ViT-B/16\n") + "iters: 10\n")  # fmt: skip
        argv = ["train", str(path), "--print-config", "--data", str(tmp_path)]  # the config train checks: with data
        argv += ["--arch", "ViT-B/16"] if "option" in how else []
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["arch"], printed["crop"], printed["img_scale"]) == ("ViT-B/16", 640, [2048, 640])
        cfg = TrainConfig.load(str(path))
        cfg.arch = "ViT-B/16"
    cfg.apply_arch_defaults()
    assert (cfg.crop, cfg.img_scale) == (640, (2048, 640))
    cfg.arch = "RN50"  # filled sizes are kept, as given ones
    cfg.apply_arch_defaults()
    assert (cfg.crop, cfg.img_scale) == (640, (2048, 640))
    rn = TrainConfig(arch="RN101", crop=480)
    rn.apply_arch_defaults()
    assert (rn.crop, rn.img_scale) == (480, (2048, 512))


def test_training_data_fills_the_architectures_sizes(generic):
    """A TrainConfig whose sizes a run has not filled (bench_data, a user's own loader) still gives crops; the
    caller's config keeps its unset sizes (it may change its arch later)."""
    cfg = TrainConfig(crop=48)
    data = SegmentationData(generic, "generic", "train", cfg)
    x, y = data[(0, 0)]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    assert data.config is not None and data.config.img_scale == (2048, 512) and cfg.img_scale is None


def test_metrics_on_hand_made_cases():
    m = SegmentationMetrics(3)
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    m.update(pred, label)
    r = m.results(["a", "b", "c"])
    # class 0: I=1, pred {0,0}, label {0,0}: union 1+... pred0 at (0,0),(1,1) -> 2; label0 2; I 1 -> U 3
    assert r["per_class"]["a"]["IoU"] == pytest.approx(1 / 3)
    assert r["per_class"]["b"]["IoU"] == pytest.approx(2 / 3)  # pred1 3 ... I 2, U 3
    assert r["per_class"]["c"]["IoU"] == pytest.approx(1 / 2)  # pred2 1 (ignored pixel not counted), label2 2
    assert r["aAcc"] == pytest.approx(4 / 6) and r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    perfect = SegmentationMetrics(4)
    perfect.update(label, label)
    r = perfect.results()
    assert r["mIoU"] == 1.0 and r["aAcc"] == 1.0 and r["per_class"]["3"]["IoU"] is None  # absent class: NaN
    # Acc is null for any class absent from the labels, IoU only when absent from the predictions too (README)
    predicted = SegmentationMetrics(4)
    predicted.update(np.where(label == 2, 3, label), label)  # class 3 predicted, never labelled
    r = predicted.results()
    assert r["per_class"]["3"] == {"IoU": 0.0, "Acc": None} and r["per_class"]["2"] == {"IoU": 0.0, "Acc": 0.0}
    assert r["mAcc"] == pytest.approx(2 / 3) and r["mIoU"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="same shape"):
        perfect.update(label[:1], label)


def test_metrics_refuse_what_would_count_wrong():
    """SegmentationMetrics took anything (a fuzz of the public API): ignore_index "255" or a class index (1) counted
    ignored pixels or dropped a class, float predictions were truncated to classes, out-of-range indices silently
    dropped, names given as one string or a set (arbitrary order) keyed the wrong classes. Each is a ValueError naming
    the argument; numpy integers and tensors of any integer dtype are what they stand for."""
    for args, message in (((0,), "num_classes must be an int >= 1, got 0"), ((2.0,), "num_classes must be an int"),
                          ((10**6,), "num_classes must be at most 65535"),
                          ((3, "255"), "ignore_index must be a label value in 0..65535"),
                          ((3, 1), "ignore_index 1 is a class index (0..2); ignored pixels need a value"),
                          ((3, -1), "ignore_index must be a label value")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            SegmentationMetrics(*args)
    m = SegmentationMetrics(np.int64(3), np.int64(255))
    label = np.array([[0, 1, 255], [2, 2, 1]], dtype=np.uint8)
    for pred, message in ((label + 0.7, "pred must hold integer class indices, got dtype float64"),
                          (label > 0, "pred must hold integer class indices, got dtype bool"),
                          (label.tolist(), "pred must be a numpy array or a tensor of class indices, got list"),
                          (label.astype(np.int64) - 5, "pred holds -5, not a class index (0..2)"),
                          (np.where(label == 2, 7, label), "pred holds 7, not a class index (0..2)")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            m.update(pred, label)
    with pytest.raises(ValueError, match=re.escape("label holds 3, neither ignore_index 255 nor a class index (0..2)")):
        m.update(np.zeros((2, 3), np.int64), np.where(label == 0, 3, label))
    assert m.union.sum() == 0  # nothing was counted by a refused update
    m.update(torch.tensor([[0, 1, -7], [2, 1, 1]], dtype=torch.int32), torch.from_numpy(label))  # ignored: any pred
    assert m.results()["aAcc"] == pytest.approx(4 / 5) and m.pred_area.sum() == 5
    for names in ("abc", {"a", "b", "c"}, [1, 2, 3], 5):
        with pytest.raises(ValueError, match=re.escape("class_names must be a list of str (one name per class")):
            m.results(names)  # type: ignore[arg-type]


def _fake_process_group(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    """torch.distributed answering as an initialised gloo process group of ``world`` processes, this one ``rank``."""
    import torch.distributed as dist

    answers = {"get_backend": "gloo", "is_initialized": True, "get_rank": rank, "get_world_size": world}
    for name, value in answers.items():
        monkeypatch.setattr(dist, name, lambda value=value: value)


def test_evaluate_refuses_wrong_arguments_before_any_image(arch_file, generic, monkeypatch):
    """evaluate checked only mode and scales (a fuzz of the public API): rank -1 evaluated the last image twice, a
    rank past the world or limit 0 none (NaN metrics), flip="no" flipped, dtype torch.int64 was dropped by autocast
    with a warning, world 2 without a process group failed in torch. Each is a ValueError naming the argument, before
    an image is read; numpy integers and bools are what they stand for."""
    model, val = build_model(_config(arch_file, generic, "x"), CLASSES), SegmentationData(generic, "generic", "val")
    read: list[int] = []
    monkeypatch.setattr(SegmentationData, "__getitem__", lambda self, i: read.append(i))
    for kwargs, message in (
        ({"model": None}, "model must be a denseclip_fast.DenseCLIP, got NoneType"),
        ({"data": "val"}, "data must be a SegmentationData (a split of a data set), got str"),
        ({"flip": "no"}, "flip must be True or False, got 'no'"), ({"progress": 1}, "progress must be True or False"),
        ({"dtype": torch.int64}, "dtype must be None (float32) or one of (torch.float32, torch.float16, torch.bfloat16)"
                                 " (the autocast dtype), got torch.int64"),
        ({"dtype": "bfloat16"}, "got the string 'bfloat16' (pass torch.bfloat16)"),
        ({"limit": 0}, "limit must be an int >= 1 (None: every image), got 0"),
        ({"limit": "1"}, "limit must be an int >= 1 (None: every image), got '1'"),
        ({"limit": True}, "limit must be an int >= 1 (None: every image), got True"),
        ({"world": 0}, "world must be an int >= 1, got 0"), ({"rank": -1}, "rank must be an int >= 0, got -1"),
        ({"rank": 1}, "rank must be in 0..0 (world 1), got 1"), ({"rank": None}, "rank must be an int >= 0, got None"),
        ({"world": 2}, "world 2 needs the default process group initialised (torchrun, then torch.distributed"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(**{"model": model, "data": val, "mode": "whole", **kwargs})
    _fake_process_group(monkeypatch, rank=1, world=2)
    with pytest.raises(ValueError, match=re.escape("rank 0 and world 2 must be the process group's: rank 1 of 2")):
        evaluate(model, val, rank=0, world=2)
    assert read == []
    monkeypatch.undo()
    result = evaluate(model, val, mode="whole", limit=np.int64(1), rank=np.int64(0), world=np.int64(1),
                      flip=np.True_, progress=np.False_)  # fmt: skip
    assert result["images"] == 1 and type(result["images"]) is int and result["flip"] is True
    assert json.loads(json.dumps(result, allow_nan=True))["flip"] is True  # (what eval's JSON file holds)


def test_metrics_equal_mmseg_on_ade20k_labels(tmp_path):
    """Areas and metrics of raw ADE20K label files against mmseg's definitions, computed here independently: the
    uint8 label with 0 -> 255, minus 1 (wrapping), 254 -> 255; pixels of ignore_index 255 dropped; per-class areas
    as torch.histc over 0..K-1, summed over the images in float64; IoU and Acc NaN where 0 / 0 (a class absent from
    both: left out of mIoU; one predicted, never labelled: IoU 0, Acc left out of mAcc); aAcc over labelled pixels."""
    rng = np.random.default_rng(0)
    k = len(ADE20K_CLASSES)
    metrics = SegmentationMetrics(k)
    totals = torch.zeros(4, k, dtype=torch.float64)
    for i, (h, w) in enumerate([(7, 9), (12, 5), (6, 6)]):
        raw = rng.choice(np.array([0, 1, 2, 3, 5, 8, 150, 255], dtype=np.uint8), size=(h, w))
        pred = rng.integers(0, 10, size=(h, w))  # class 9 is predicted, never labelled; 10..148 neither
        Image.fromarray(raw).save(tmp_path / f"{i}.png")
        metrics.update(pred, read_label(str(tmp_path / f"{i}.png"), k, True))
        label = torch.from_numpy(raw.copy())
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
        keep = label != 255
        p, y = torch.from_numpy(pred)[keep].float(), label[keep].float()
        inter, area_pred, area_label = (torch.histc(t, bins=k, min=0, max=k - 1) for t in (p[p == y], p, y))
        totals += torch.stack([inter, area_pred + area_label - inter, area_pred, area_label]).double()
    inter, union, _, area_label = totals.numpy()
    with np.errstate(invalid="ignore"):
        iou, acc = inter / union, inter / area_label
    r = metrics.results()
    # classes 0..9 predicted, 0, 1, 2, 4, 7 and 149 (raw 150) labelled
    assert np.isnan(iou).sum() == k - 11 and np.isnan(acc).sum() == k - 6 and area_label[149] > 0
    assert r["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-15) and r["mAcc"] == pytest.approx(np.nanmean(acc))
    assert r["aAcc"] == pytest.approx(inter.sum() / area_label.sum(), abs=1e-15)
    assert [c["IoU"] for c in r["per_class"].values()] == [None if np.isnan(v) else v for v in iou]
    assert [c["Acc"] for c in r["per_class"].values()] == [None if np.isnan(v) else v for v in acc]

def test_repeated_class_names_keep_one_entry_each():
    """A trained head's names may repeat (a classes.txt of wall, wall, cat, bed): keyed by name, the second wall's
    IoU would replace the first's. Each repeated name is keyed with its class index; unique names stay as they are."""
    m = SegmentationMetrics(4)
    m.update(np.array([[0, 1, 1, 2, 3]]), np.array([[0, 0, 1, 2, 3]]))
    r = m.results(["wall", "wall", "cat", "bed"])
    assert list(r["per_class"]) == ["wall [0]", "wall [1]", "cat", "bed"]
    assert r["per_class"]["wall [0]"]["IoU"] == 0.5 and r["per_class"]["wall [1]"]["IoU"] == 0.5
    # a key made so would equal another class's name: every class is keyed with its index
    assert list(m.results(["a", "a", "a [1]", "b"])["per_class"]) == ["a [0]", "a [1]", "a [1] [2]", "b [3]"]
    with pytest.raises(ValueError, match="class_names has 3 names but the metrics have 4 classes"):
        m.results(["a", "b", "c"])


def test_evaluate_leaves_the_model_in_the_mode_it_found(arch_file, tmp_path):
    """evaluate runs the model in eval mode and gives it back in its own: a training model (the trainer's periodic
    evaluation) trains on, and an eval-mode one (an API user's, a loaded checkpoint) stays in eval, not left with
    dropout on and BatchNorm statistics moving by a model.train() that ignores the mode it had."""
    data = make_generic(tmp_path / "g", n=1, splits=False)
    model = build_model(_config(arch_file, data, "x"), CLASSES)
    val = SegmentationData(data, "generic", "val")
    for training in (True, False):
        model.train(training)
        assert evaluate(model, val, mode="whole")["images"] == 1
        assert model.training is training and all(m.training is training for m in model.modules())


def test_a_distributed_evaluation_error_reaches_every_process(arch_file, tmp_path, monkeypatch):
    """A bad label read by one process raised there while the others waited in the metrics' all_reduce (until the
    collective timed out). The failure is summed in that collective: the process that read it raises its error, the
    others a RuntimeError saying so. Two processes simulated: the collective adds the other process's areas and flag."""
    import torch.distributed as dist

    data = make_generic(tmp_path / "g", n=2, splits=False)
    model = build_model(_config(arch_file, data, "x"), CLASSES)
    other_failed = []
    _fake_process_group(monkeypatch, rank=0, world=2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t[-1:].add_(int(bool(other_failed))))
    val = SegmentationData(data, "generic", "val")
    assert evaluate(model, val, rank=0, world=2)["images"] == 2  # fine everywhere: a result
    other_failed.append(True)
    with pytest.raises(RuntimeError, match=r"^the evaluation failed in 1 other process\(es\)"):
        evaluate(model, val, rank=0, world=2)
    Image.fromarray(np.full((40, 56), 7, dtype=np.uint8)).save(tmp_path / "g" / "labels" / "scene_0.png")
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: calls.append(int(t[-1])))
    with pytest.raises(ValueError, match="scene_0.png: label value 7 is out of range"):
        evaluate(model, SegmentationData(data, "generic", "val"), rank=0, world=2)
    assert calls == [1]  # its failure was told to the others before it raised


@pytest.mark.slow
def test_hsv_conversions_equal_opencvs_on_every_value():
    """The 8-bit HSV conversions of the photometric distortion equal cv2.cvtColor's (mmseg's) on all 2^24 RGB
    colours and all 180 x 256 x 256 HSV triples, in rows of 256 pixels (OpenCV's vector code). They were the textbook
    float64 formulas rounded to nearest: RGB -> HSV differed on 365,213 colours (RGB (0, 1, 4) has H 112.5, which
    OpenCV rounds up), HSV -> RGB on 74% of the triples (OpenCV's vector code truncates)."""
    cv2 = pytest.importorskip("cv2")
    rest = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), axis=-1).reshape(256, 256, 2)
    for first in range(0, 256, 32):  # 32 x 256 x 256 at a time
        chunk = np.concatenate([np.broadcast_to((first + np.arange(32))[:, None, None, None], (32, 256, 256, 1)),
                                np.broadcast_to(rest, (32, 256, 256, 2))], axis=-1).reshape(-1, 256, 3)  # fmt: skip
        chunk = chunk.astype(np.uint8)
        assert np.array_equal(_to_hsv8(chunk.astype(np.float64)), cv2.cvtColor(chunk, cv2.COLOR_RGB2HSV)), first
        if first < 180:
            hsv = chunk[: min(32, 180 - first) * 256]
            assert np.array_equal(_from_hsv8(hsv.astype(np.float64)), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)), first


class _Recorded:
    """A numpy Generator that records each draw (method, arguments, value), for a replay in another order."""

    def __init__(self, seed: int) -> None:
        self.rng, self.draws = np.random.default_rng(seed), []

    def __getattr__(self, method: str):
        def draw(*args):
            value = getattr(self.rng, method)(*args)
            self.draws.append((method, args, value))
            return value

        return draw


def _mmseg_sample(rgb, label, draws, crop, img_scale, cat_max_ratio=0.75):
    """mmseg 0.x's training pipeline (Resize ratio_range (0.5, 2), RandomCrop, RandomFlip, PhotoMetricDistortion,
    Normalize, Pad) in OpenCV on BGR uint8 as mmcv computes it, each random draw taken from ``draws`` in mmseg's
    order and with mmseg's range (checked)."""
    cv2 = pytest.importorskip("cv2")

    def take(method, *args):
        got, given, value = draws.pop(0)
        assert (got, tuple(given)) == (method, args)
        return value

    img, seg = np.ascontiguousarray(rgb[..., ::-1]), label.astype(np.uint8)
    ratio = take("uniform", 0.5, 2.0)
    scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
    h, w = img.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))  # mmcv.rescale_size
    size = (int(w * f + 0.5), int(h * f + 0.5))
    img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)

    def box():
        top = take("integers", 0, max(seg.shape[0] - crop, 0) + 1)
        left = take("integers", 0, max(seg.shape[1] - crop, 0) + 1)
        return top, left

    top, left = box()
    for _ in range(10):
        names, counts = np.unique(seg[top : top + crop, left : left + crop], return_counts=True)
        counts = counts[names != 255]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        top, left = box()
    img, seg = img[top : top + crop, left : left + crop], seg[top : top + crop, left : left + crop]
    if take("random") < 0.5:
        img, seg = img[:, ::-1], seg[:, ::-1]

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if take("integers", 2):
        img = convert(img, beta=take("uniform", -32, 32))
    mode = take("integers", 2)

    def contrast(x):
        return convert(x, alpha=take("uniform", 0.5, 1.5)) if take("integers", 2) else x

    img = contrast(img) if mode == 1 else img
    if take("integers", 2):
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
        hsv[..., 1] = convert(hsv[..., 1], alpha=take("uniform", 0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if take("integers", 2):
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + take("integers", -18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    img = contrast(img) if mode == 0 else img
    assert draws == []  # every draw of ours is one of mmseg's
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)  # of 0..255 values
    x = (img[..., ::-1].astype(np.float32) - mean) / std  # Normalize(to_rgb=True)
    out, out_label = np.zeros((crop, crop, 3), np.float32), np.full((crop, crop), 255, np.uint8)
    out[: x.shape[0], : x.shape[1]], out_label[: seg.shape[0], : seg.shape[1]] = x, seg
    return out.transpose(2, 0, 1), out_label


def test_a_training_sample_is_mmsegs_given_the_same_draws():
    """train_transform against mmseg's pipeline written in OpenCV (``_mmseg_sample``) fed with the draws it made:
    the same label and, to float32 rounding, the same image, on random sizes and seeds. The crops here are whole
    64-pixel rows (OpenCV's HSV -> RGB rounds otherwise on a row's tail: README, Training)."""
    rng = np.random.default_rng(3)
    for seed in range(12):
        h, w = (int(n) for n in rng.integers(33, 160, size=2))
        image, label = _scene(rng, (h, w))
        label = np.where(rng.random(label.shape) < 0.02, 255, label)
        recorded = _Recorded(seed)
        x, y = train_transform(image, label.astype(np.int64), recorded, crop=64, img_scale=(512, 128),
                               ratio_range=(0.5, 2.0), cat_max_ratio=0.75)  # fmt: skip
        ref_x, ref_y = _mmseg_sample(image, label, list(recorded.draws), 64, (512, 128))
        assert np.array_equal(y.numpy(), ref_y.astype(np.int64)), (seed, h, w)
        assert np.abs(x.numpy() - ref_x).max() < 1e-5, (seed, h, w)


def test_augmentation_pieces():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, size=(20, 20, 3))
    pixels = np.round(rgb)
    assert np.abs(_from_hsv8(_to_hsv8(pixels)) - pixels).max() <= 5  # a round trip through 8-bit HSV (truncating)
    for seed in range(20):  # mmseg quantises to uint8 after every step
        out = photometric_distortion(pixels, np.random.default_rng(seed))
        assert out.shape == pixels.shape and out.min() >= 0 and out.max() <= 255 and np.array_equal(out, np.round(out))
    image, label = _scene(rng, (30, 50))
    x, y = train_transform(image, label.astype(np.int64), rng, crop=64, img_scale=(96, 48), ratio_range=(0.5, 2.0),
                           cat_max_ratio=0.75)  # fmt: skip
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.long
    valid = y != 255
    assert set(y[valid].unique().tolist()) <= {0, 1, 2} and (x[:, ~valid] == 0).all()  # padding: 0 and 255
    one_class = np.zeros((100, 100), dtype=np.int64)
    one_class[:, 90:] = 1
    top, left = random_crop_box(one_class, 40, 0.75, np.random.default_rng(0))
    window = one_class[top : top + 40, left : left + 40]
    assert 0 <= top <= 60 and 0 <= left <= 60 and window.shape == (40, 40)


def test_the_crop_check_is_mmsegs_strict_ratio_of_the_labelled_pixels():
    """mmseg's RandomCrop keeps a box once ``len(cnt) > 1 and max(cnt) / sum(cnt) < cat_max_ratio``, cnt the pixel
    counts of the classes in it, the ignore index left out. On a label the size of the crop (every box the same)
    the draws tell what was decided: 2 for a box kept at once, 2 x 11 for one redrawn 10 times. The sample test
    above rarely meets either edge: a box at exactly 0.75 (a <= kept it), and one of a class and ignored pixels
    (counting the ignored pixels as a class, at 0.7, kept it)."""
    def draws(label: np.ndarray) -> int:
        recorded = _Recorded(0)
        assert random_crop_box(label, 8, 0.75, recorded) == (0, 0)
        return len(recorded.draws)

    label = np.zeros((8, 8), dtype=np.int64)
    label[:2] = 1  # 48 of 64 pixels class 0: 0.75, not under it
    assert draws(label) == 22
    label[2, :1] = 1  # 47: kept
    assert draws(label) == 2
    one_class = np.zeros((8, 8), dtype=np.int64)
    one_class.reshape(-1)[:20] = 255  # 44 pixels of class 0 and 20 ignored: one class
    assert draws(one_class) == 22
    one_class.reshape(-1)[:4] = 1  # and 4 of class 1: 40 / 44 of the labelled pixels
    assert draws(one_class) == 22


# ------------------------------------------------------------------------------------------------ bad data


def test_a_run_whose_evaluation_is_its_training_images_says_so(arch_file, tmp_path, capsys):
    """A generic layout without splits/ evaluates on the training images (documented): the run says so on stderr
    once, naming the folder; with splits/, or the ADE20K layout, nothing is said."""
    from denseclip_fast.train.data import shared_split_note

    data = make_generic(tmp_path / "g", n=3, splits=False)
    note = shared_split_note(data, "generic")
    assert note is not None and note.startswith(f"{data} has no splits/ folder, so every image serves both training "
                                                "and evaluation")  # fmt: skip
    assert "the mIoU measures the fit to the training images" in note
    assert shared_split_note(make_generic(tmp_path / "s", n=3), "generic") is None
    assert shared_split_note(data, "ade20k") is None
    kept = make_generic(tmp_path / "k", n=3, splits=False)
    os.makedirs(os.path.join(kept, "splits"))
    open(os.path.join(kept, "splits", ".gitkeep"), "w").close()  # an empty folder kept in git: still no splits
    held = f"{os.path.join(kept, 'splits')} holds no split files"
    assert shared_split_note(kept, "generic") == note.replace(f"{data} has no splits/ folder", held)
    assert SegmentationData(kept, "generic", "train").samples == SegmentationData(kept, "generic", "val").samples
    capsys.readouterr()
    train(_config(arch_file, data, tmp_path / "run", iters=1, checkpoint_interval=1))
    assert capsys.readouterr().err.count(f"denseclip-fast train: {note}") == 1


def test_bad_files_are_named(tmp_path):
    data = make_generic(tmp_path / "g", n=3, splits=False)
    (tmp_path / "g" / "images" / "scene_1.png").write_bytes(b"not a png")
    ds = SegmentationData(data, "generic", "train")
    assert len(ds) == 3 and ds.class_names == CLASSES
    with pytest.raises(ValueError, match="scene_1.png: not a readable image"):
        ds.read(1)
    Image.fromarray(np.full((4, 4), 3, dtype=np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad.png: label value 3 is out of range for 3 classes \(valid: 0..2"):
        read_label(str(tmp_path / "bad.png"), 3, False)
    Image.fromarray(np.full((4, 4), 151, dtype=np.uint8)).save(tmp_path / "ade.png")
    with pytest.raises(ValueError, match=re.escape("ade.png: label value 151 is out of range for 150 classes (valid: "
                                                   "1..150, and 0 and 255 for ignored pixels)")):  # fmt: skip
        read_label(str(tmp_path / "ade.png"), 150, True)
    os.remove(tmp_path / "g" / "labels" / "scene_2.png")
    with pytest.raises(ValueError, match="have no label file, e.g. .*scene_2.png"):
        SegmentationData(data, "generic", "train")


def test_bad_labels_class_lists_splits_and_layouts_are_named(tmp_path):
    """A label file that is no image, or an RGB one, names the file and what a label must be; a generic data set
    without classes.txt, or with an empty one, names that file; find_samples takes the splits and layouts it knows
    only."""
    (tmp_path / "label.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'label.png'}: not a readable label image")):
        read_label(str(tmp_path / "label.png"), 3, False)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rgb.png'}: a label must be a single-channel image "
                                                   "of class indices, got shape (4, 5, 3)")):  # fmt: skip
        read_label(str(tmp_path / "rgb.png"), 3, False)
    data = make_generic(tmp_path / "g", n=2, splits=False)
    classes = os.path.join(data, "classes.txt")
    os.remove(classes)
    with pytest.raises(ValueError, match=re.escape(f"{classes} is missing (one class name a line)")):
        find_samples(data, "generic", "train")
    Path(classes).write_text("")
    with pytest.raises(ValueError, match=re.escape(f"{classes} lists no class names")):
        find_samples(data, "generic", "train")
    Path(classes).write_text("\n".join(CLASSES) + "\n")
    assert len(find_samples(data, "generic", "val")[0]) == 2
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        find_samples(data, "generic", "test")
    with pytest.raises(ValueError, match="layout must be 'ade20k' or 'generic', got 'voc'"):
        find_samples(data, "voc", "train")


@pytest.mark.parametrize("kept, renamed", [("train.txt", None), ("val.txt", None), ("train.txt", "validation.txt")])
def test_one_split_file_alone_is_refused_not_filled_with_every_image(tmp_path, kept, renamed):
    """A split file without its partner (or with a misnamed one) is refused for both splits: the missing split
    would be every image, so validation images were trained on. Without splits/, every image serves both."""
    data = make_generic(tmp_path / "g")
    splits = tmp_path / "g" / "splits"
    missing = "val.txt" if kept == "train.txt" else "train.txt"
    if renamed:
        os.rename(splits / missing, splits / renamed)
    else:
        os.remove(splits / missing)
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=rf"splits.{missing} is missing \(.*splits holds .*{kept}.*\): give "
                                             r"both split files, train.txt and val.txt, or neither"):  # fmt: skip
            SegmentationData(data, "generic", split)
    shutil.rmtree(splits)
    assert len(SegmentationData(data, "generic", "train")) == len(SegmentationData(data, "generic", "val")) == 6


@pytest.mark.parametrize("folder, first, second", [("images", "scene_0.jpg", "scene_0.png"),
                                                   ("labels", "scene_0.PNG", "scene_0.png")])  # fmt: skip
def test_two_files_of_one_name_are_refused_naming_both(tmp_path, folder, first, second):
    """An image saved as both .jpg and .png, or a label as .png and .PNG: which one a sample takes is not guessed
    (the later file in sorted order won, silently)."""
    data = make_generic(tmp_path / "g", n=2, splits=False)
    shutil.copy(tmp_path / "g" / folder / "scene_0.png", tmp_path / "g" / folder / first)
    if len(os.listdir(tmp_path / "g" / folder)) == 2:
        pytest.skip("a case-insensitive file system: scene_0.PNG is scene_0.png")
    with pytest.raises(ValueError, match=rf"{folder}.{first} and .*{folder}.{second} have the same NAME 'scene_0': "
                                         "keep one file per name"):  # fmt: skip
        SegmentationData(data, "generic", "val")


def test_a_val_split_listing_an_image_twice_is_refused(tmp_path):
    """val.txt naming an image twice counted it twice in mIoU and aAcc; train.txt may repeat one (oversampling)."""
    data = make_generic(tmp_path / "g", n=4)
    (tmp_path / "g" / "splits" / "val.txt").write_text("scene_3\nscene_2\nscene_3\n")
    (tmp_path / "g" / "splits" / "train.txt").write_text("scene_0\nscene_1\nscene_0\n")
    with pytest.raises(ValueError, match=r"val.txt lists 1 name\(s\) more than once, e.g. 'scene_3': an evaluation "
                                         r"would count each of them as often; list every image once$"):  # fmt: skip
        SegmentationData(data, "generic", "val")
    assert len(SegmentationData(data, "generic", "train", TrainConfig(crop=48, img_scale=(96, 48)))) == 3


def test_images_of_other_extensions_are_named_with_the_accepted_ones(tmp_path):
    """A folder of .gif images (or labels) is said to hold none of the accepted extensions, with what was skipped."""
    data = make_generic(tmp_path / "g", n=2)
    for name in ("scene_0", "scene_1"):
        os.rename(tmp_path / "g" / "images" / f"{name}.png", tmp_path / "g" / "images" / f"{name}.gif")
    shutil.rmtree(tmp_path / "g" / "splits")
    accepted = r"\.bmp, \.jpeg, \.jpg, \.png, \.ppm, \.tif, \.tiff or \.webp"  # segment's
    with pytest.raises(ValueError, match=rf"no val images found in .*images \(generic layout: images are {accepted} "
                                         r"files, any letter case; 2 file\(s\) of other extensions skipped, e.g. "
                                         r"scene_0.gif\)$"):  # fmt: skip
        SegmentationData(data, "generic", "val")
    os.makedirs(tmp_path / "g" / "splits")
    (tmp_path / "g" / "splits" / "train.txt").write_text("scene_0\n")
    (tmp_path / "g" / "splits" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"val.txt lists no names \(one image NAME a line\)"):
        SegmentationData(data, "generic", "val")
    with pytest.raises(ValueError, match=r"train.txt lists 1 name\(s\) without an image, e.g. 'scene_0' \(images "
                                         r"in .*images are \.bmp, .*, .*skipped, e.g. scene_0.gif\)"):  # fmt: skip
        SegmentationData(data, "generic", "train")
    ade = make_ade20k(tmp_path / "ade")
    labels = tmp_path / "ade" / "annotations" / "validation"
    for name in os.listdir(labels):
        os.rename(labels / name, labels / name.replace(".png", ".bmp"))
    with pytest.raises(ValueError, match=r"2 image\(s\) in .* have no label file, e.g. .*00000000.jpg \(labels in "
                                         r".*validation are NAME.png files, any letter case; 2 file\(s\) of other "
                                         r"extensions skipped, e.g. ADE_validation_00000000.bmp\)"):  # fmt: skip
        SegmentationData(ade, "ade20k", "val")


def test_a_folder_of_the_other_layout_is_said_to_be_so(arch_file, tmp_path, capsys):
    """train's default layout is ade20k: a generic folder was told that images/training does not exist, as if the
    data were incomplete. A folder with the other layout's marks is said to look like it, with the option to pass;
    one with neither's is told what is missing, as before."""

    gen, ade = make_generic(tmp_path / "gen", n=2, splits=False), make_ade20k(tmp_path / "ade", n=1)
    assert main(["train", "--arch", arch_file, "--data", gen, "--device", "cpu", "--work-dir",
                 str(tmp_path / "w")]) == 2  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"denseclip-fast: error: {os.path.join(gen, 'images', 'training')} does not exist (ade20k layout), but {gen} "
        "looks like the generic layout (DIR/images, DIR/labels, DIR/classes.txt): pass --layout generic (train's "
        "default is ade20k; layout: generic in a config)"
    )
    os.remove(os.path.join(gen, "classes.txt"))  # image files right in images/, beside labels/: still generic
    with pytest.raises(ValueError, match="looks like the generic layout"):
        find_samples(gen, "ade20k", "val")
    with pytest.raises(ValueError, match=re.escape(f"{os.path.join(ade, 'labels')} does not exist (generic layout), "
                                                   f"but {ade} looks like the ade20k layout (DIR/images/training, "
                                                   "DIR/annotations/training): pass --layout ade20k (layout: ade20k "
                                                   "in a config)")):  # fmt: skip
        find_samples(ade, "generic", "train")
    os.makedirs(tmp_path / "empty" / "images")
    with pytest.raises(ValueError, match=r"empty.images.training does not exist \(the layouts: README.md"):
        find_samples(str(tmp_path / "empty"), "ade20k", "train")


def test_images_in_subfolders_are_said_not_to_be_searched(tmp_path):
    """images/train/x.png was counted as "1 file(s) of other extensions skipped, e.g. train": a subfolder is said to
    be one, and that subfolders are not searched."""
    data = make_generic(tmp_path / "g", n=2, splits=False)
    for folder in ("images", "labels"):
        os.makedirs(tmp_path / "g" / folder / "train")
        for name in ("scene_0.png", "scene_1.png"):
            os.rename(tmp_path / "g" / folder / name, tmp_path / "g" / folder / "train" / name)
    (tmp_path / "g" / "images" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"no train images found in .*images \(generic layout: images are \.bmp, .* "
                                         r"or \.webp files, any letter case; 1 file\(s\) of other extensions "
                                         r"skipped, e.g. notes.txt; 1 subfolder\(s\) skipped, e.g. train: subfolders "
                                         r"are not searched\)$"):  # fmt: skip
        SegmentationData(data, "generic", "train")


def test_a_folder_named_like_an_image_is_not_a_sample(tmp_path):
    """images/more.png/ (a folder) was taken for an image, paired with labels/more.png/, and the run failed when a
    worker opened it; folders are left out of the listing, as hidden files are."""
    data = make_generic(tmp_path / "g", n=2, splits=False)
    for folder in ("images", "labels"):
        os.makedirs(tmp_path / "g" / folder / "more.png")
    samples, _ = find_samples(data, "generic", "train")
    assert [os.path.basename(s.image) for s in samples] == ["scene_0.png", "scene_1.png"]
    assert len(SegmentationData(data, "generic", "train")) == 2
    # a link to an image is one; a broken link of an image's name is refused when the data is listed, not when a
    # worker opens it hours into the run; a FIFO is no image (reading it could block forever)
    os.symlink(tmp_path / "g" / "images" / "scene_1.png", tmp_path / "g" / "images" / "linked.png")
    os.symlink(tmp_path / "g" / "labels" / "scene_1.png", tmp_path / "g" / "labels" / "linked.png")
    assert len(find_samples(data, "generic", "train")[0]) == 3
    os.mkfifo(tmp_path / "g" / "images" / "pipe.png")
    assert len(find_samples(data, "generic", "train")[0]) == 3
    os.symlink(tmp_path / "gone.png", tmp_path / "g" / "images" / "scene_2.png")
    with pytest.raises(ValueError, match=r"scene_2.png: a symbolic link whose target cannot be reached \(.*gone.png: "
                                         r"missing"):  # fmt: skip
        find_samples(data, "generic", "train")


@pytest.mark.parametrize("suffix, options", [(".bmp", {}), (".webp", {"lossless": True}), (".tif", {}),
                                             (".PPM", {})])  # fmt: skip
def test_training_reads_every_image_format_segment_reads(tmp_path, suffix, options):
    """images/scene_0.bmp (.webp, .tif, .ppm) beside labels/scene_0.png is a sample, read as the .png it was
    saved from (lossless formats): training takes what segment and eval read, not only .jpg and .png (it was left
    out without a word, later refused). The ADE20K layout too."""
    data = make_generic(tmp_path / "g", n=3, splits=False)
    image = tmp_path / "g" / "images" / "scene_0.png"
    pixels = np.asarray(Image.open(image).convert("RGB"))
    Image.open(image).save(image.with_suffix(suffix), **options)
    os.remove(image)
    samples, _ = find_samples(data, "generic", "train")
    assert [s.image for s in samples][0] == str(image.with_suffix(suffix)) and len(samples) == 3
    read, label = SegmentationData(data, "generic", "train").read(0)
    assert np.array_equal(read, pixels) and label.shape == pixels.shape[:2]
    ade = make_ade20k(tmp_path / "a", n=2)
    image = tmp_path / "a" / "images" / "training" / "ADE_training_00000000.jpg"
    Image.open(image).save(image.with_suffix(suffix), **options)
    os.remove(image)
    assert str(image.with_suffix(suffix)) in [s.image for s in find_samples(ade, "ade20k", "train")[0]]


def test_split_names_with_their_extension_are_said_to_need_none(tmp_path):
    """splits/train.txt listing s0.png for the image s0.png was told only that s0.png has no image."""
    data = make_generic(tmp_path / "g", n=4)
    (tmp_path / "g" / "splits" / "train.txt").write_text("scene_0.png\nscene_1.png\n")
    with pytest.raises(ValueError, match=r"train.txt lists 2 name\(s\) without an image, e.g. 'scene_0.png': a split "
                                         r"file lists image NAMEs without their extension \('scene_0', not "
                                         r"'scene_0.png'\)$"):  # fmt: skip
        SegmentationData(data, "generic", "train")


def _with_orientation(path, orientation: int) -> None:
    """Rewrites the image at ``path`` (its pixels as they are) with an EXIF orientation tag."""
    with Image.open(path) as img:
        img.load()
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, exif=exif.tobytes())


def test_a_label_of_an_image_that_exif_turns_says_so(tmp_path):
    """As mmcv, the image is turned upright by its EXIF orientation and the label read as stored: a label of the
    stored 40x56 pixels differs from the turned 56x40 image, and the message says why. A label of the upright size
    is read, and an orientation that keeps the sides (3: half a turn) passes as before."""
    data = make_generic(tmp_path / "g", n=3, splits=False)
    images, labels = tmp_path / "g" / "images", tmp_path / "g" / "labels"
    _with_orientation(images / "scene_0.png", 6)
    _with_orientation(images / "scene_1.png", 8)
    with Image.open(labels / "scene_1.png") as label:
        label.transpose(Image.Transpose.ROTATE_90).save(labels / "scene_1.png")
    _with_orientation(images / "scene_2.png", 3)
    ds = SegmentationData(data, "generic", "val")
    with pytest.raises(ValueError, match=re.escape("scene_0.png: label size (40, 56) differs from its image's (56, "
                                                   "40), which its EXIF orientation (6) turns from the stored (40, "
                                                   "56); the label is read as stored, as mmseg does")):  # fmt: skip
        ds.read(0)
    assert ds.read(1)[0].shape == (56, 40, 3) and ds.read(1)[1].shape == (56, 40)
    assert ds.read(2)[0].shape == (40, 56, 3)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(labels / "scene_2.png")
    with pytest.raises(ValueError, match=r"scene_2.png: label size \(40, 50\) differs from its image's \(40, 56\)$"):
        ds.read(2)


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    """classes.txt and the split files saved with a UTF-8 BOM (as Windows editors may) read as without one."""
    data = make_generic(tmp_path / "g")
    (tmp_path / "g" / "classes.txt").write_text("\ufeff" + "\n".join(CLASSES) + "\n", encoding="utf-8")
    (tmp_path / "g" / "splits" / "val.txt").write_text("\ufeffscene_4\nscene_5\n", encoding="utf-8")
    ds = SegmentationData(data, "generic", "val")
    assert ds.class_names == CLASSES
    assert [os.path.basename(s.image) for s in ds.samples] == ["scene_4.png", "scene_5.png"]
    for name in ("classes.txt", os.path.join("splits", "val.txt")):  # Latin-1, not UTF-8: the file is named
        path = tmp_path / "g" / name
        saved = path.read_bytes()
        path.write_bytes("caf\u00e9\n".encode("latin-1") + saved.removeprefix(b"\xef\xbb\xbf"))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not UTF-8 text \(byte 3: invalid "):
            SegmentationData(data, "generic", "val")
        path.write_bytes(saved)


def test_a_blank_line_between_class_names_is_refused_by_its_line(tmp_path):
    """A blank line inside classes.txt was dropped, so every class after it took the index before its own (mmseg
    counts the line); trailing blank lines and surrounding spaces are no class."""
    data = make_generic(tmp_path / "g")
    classes = tmp_path / "g" / "classes.txt"
    classes.write_text(f"  {CLASSES[0]}\n{CLASSES[1]} \n" + "\n".join(CLASSES[2:]) + "\n\n \n")
    assert SegmentationData(data, "generic", "val").class_names == CLASSES
    classes.write_text(f"{CLASSES[0]}\n\n" + "\n".join(CLASSES[1:]) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(classes))} line 2 is blank: a class's index is its line's "
                                         r"position \(0 for the first\), so the classes after it would be counted "
                                         "one off"):  # fmt: skip
        SegmentationData(data, "generic", "val")


def test_hidden_files_are_no_samples(tmp_path):
    """macOS's ._NAME.png resource forks beside the images and labels (a data set copied from a Mac to a FAT or
    network drive) were taken for samples and refused the whole data set."""
    data = make_generic(tmp_path / "g", splits=False)  # every image a sample

    def names() -> list[tuple[str, str]]:
        samples = SegmentationData(data, "generic", "train").samples
        return [(os.path.basename(s.image), os.path.basename(s.label)) for s in samples]

    expected = names()
    for folder in ("images", "labels"):
        (tmp_path / "g" / folder / "._scene_4.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (tmp_path / "g" / "images" / "._scene_5.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # an image alone
    assert names() == expected and len(expected) == 6


def test_reduce_zero_label_as_mmseg(tmp_path):
    """ADE20K labels: 0 is ignored and k becomes k - 1; a pixel already holding the ignore value stays ignored
    (mmseg: 0 -> 255, minus 1, 254 -> 255), also with a 16-bit ignore value."""
    Image.fromarray(np.array([[0, 1, 150, 255]], dtype=np.uint8)).save(tmp_path / "ade.png")
    assert read_label(str(tmp_path / "ade.png"), 150, True).tolist() == [[255, 0, 149, 255]]
    Image.fromarray(np.array([[0, 65535, 300, 1]], dtype=np.uint16)).save(tmp_path / "ade16.png")
    assert read_label(str(tmp_path / "ade16.png"), 400, True, 65535).tolist() == [[65535, 65535, 299, 0]]
    # an ignore value that is a class's value (value 150 is class 149 of 150) is that class, not ignored
    Image.fromarray(np.array([[0, 1, 150]], dtype=np.uint8)).save(tmp_path / "last.png")
    assert read_label(str(tmp_path / "last.png"), 150, True, 150).tolist() == [[150, 0, 149]]
    # the value after the ignore value is out of range, not ignored (it became the ignore value after the shift)
    Image.fromarray(np.array([[0, 256]], dtype=np.uint16)).save(tmp_path / "past.png")
    with pytest.raises(ValueError, match=re.escape("label value 256 is out of range for 150 classes (valid: 1..150, "
                                                   "and 0 and 255 for ignored pixels)")):  # fmt: skip
        read_label(str(tmp_path / "past.png"), 150, True, 255)


def test_an_image_too_elongated_to_evaluate_stops_training_before_it_starts(arch_file, tmp_path):
    """The final evaluation's images are checked (their headers) before the training: a 2x300 one, resized to fit
    the test scale (128, 64) to 1x128, is named then, not after the whole run."""
    data = make_generic(tmp_path / "g", n=3, splits=False)
    Image.fromarray(np.zeros((2, 300, 3), np.uint8)).save(tmp_path / "g" / "images" / "scene_1.png")
    Image.fromarray(np.zeros((2, 300), np.uint8)).save(tmp_path / "g" / "labels" / "scene_1.png")
    with pytest.raises(ValueError, match=r"scene_1.png of \(2, 300\) pixels is resized to \(1, 128\) to fit"):
        train(_config(arch_file, data, tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("bad", ["scene_1", "scene_5"])  # a training label, a validation one
def test_a_label_of_another_size_stops_training_before_it_starts(arch_file, tmp_path, bad):
    """Each split's label sizes are compared with their images' from the headers before the training, with the
    reader's message: a validation label was found at the first evaluation (after the whole run), a training one
    when a DataLoader worker read it."""
    data = make_generic(tmp_path / "g")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "g" / "labels" / f"{bad}.png")
    with pytest.raises(ValueError, match=rf"{bad}.png: label size \(40, 50\) differs from its image's \(40, 56\)$"):
        train(_config(arch_file, data, tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def _exif_after_the_pixels(path) -> None:
    """Moves a PNG's eXIf chunk after its pixel data, where Pillow finds it only by decoding the image."""
    data = Path(path).read_bytes()
    chunks, pos = [], 8
    while pos < len(data):
        end = pos + 12 + int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos:end])
        pos = end
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    Path(path).write_bytes(data[:8] + b"".join(rest[:-1] + exif + rest[-1:]))


def test_label_sizes_from_the_headers_follow_the_exif_orientation(tmp_path):
    """The up-front check sizes an image as load_image turns it: a label of the upright size passes, also when the
    orientation follows a PNG's pixels (the header alone does not show it); one of the stored size is refused with
    the reader's message."""
    data = make_generic(tmp_path / "g", n=3, splits=False)
    images, labels = tmp_path / "g" / "images", tmp_path / "g" / "labels"
    for name in ("scene_0", "scene_1", "scene_2"):
        _with_orientation(images / f"{name}.png", 6)
    for name in ("scene_0", "scene_1"):  # labelled upright
        with Image.open(labels / f"{name}.png") as label:
            label.transpose(Image.Transpose.ROTATE_270).save(labels / f"{name}.png")
    _exif_after_the_pixels(images / "scene_1.png")
    assert image_size(images / "scene_1.png", upright=True) == (40, 56)  # the header: no orientation
    ds = SegmentationData(data, "generic", "val")
    ds.check_label_sizes([0, 1])
    assert [ds.read(i)[1].shape for i in (0, 1)] == [(56, 40)] * 2
    with pytest.raises(ValueError, match=r"scene_2.png: label size \(40, 56\) differs from its image's \(56, 40\), "
                                         r"which its EXIF orientation \(6\) turns"):  # fmt: skip
        ds.check_label_sizes()


def test_a_training_image_too_thin_for_the_resize_is_named_before_the_run(tmp_path):
    """A 1 x 300 strip, resized to fit (96, 48) x 0.5: 0 rows. It failed in a DataLoader worker at whatever iteration
    drew that ratio, with 'size must be positive' and no file name; the up-front check names it."""
    data = make_generic(tmp_path / "g", n=3, splits=False)
    Image.fromarray(np.zeros((1, 300, 3), np.uint8)).save(tmp_path / "g" / "images" / "scene_1.png")
    Image.fromarray(np.zeros((1, 300), np.uint8)).save(tmp_path / "g" / "labels" / "scene_1.png")
    cfg = TrainConfig(crop=48, img_scale=(96, 48), ratio_range=(0.5, 2.0))
    ds = SegmentationData(data, "generic", "train", cfg)
    with pytest.raises(ValueError, match=r"scene_1.png: a 1x300 image, resized for training at the low end of "
                                         r"ratio_range \(0.5 x img_scale \(96, 48\)\), is 0x48 pixels, a side of "
                                         r"none: crop or drop it, or raise ratio_range's low end$"):  # fmt: skip
        ds.check_label_sizes()
    ds.check_label_sizes([0])
    SegmentationData(data, "generic", "val").check_label_sizes()  # evaluation does not resize so


def test_more_than_255_classes_with_16_bit_labels(tmp_path):
    """With 256+ classes, 255 is a class: the default ignore value is refused with what to do, and another one
    (65535 in 16-bit label PNGs) flows through the labels, the crop padding and the metrics."""
    root = tmp_path / "wide"
    os.makedirs(root / "images"), os.makedirs(root / "labels")
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(300)) + "\n")
    image, bands = _scene(np.random.default_rng(0), (30, 40))
    label = np.array([255, 299, 7], dtype=np.uint16)[bands]
    label[0, :5] = 65535
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(label).save(root / "labels" / "a.png")
    with pytest.raises(ValueError, match=r"ignore_index 255 is a class index: the data set has 300 classes.*65535"):
        SegmentationData(str(root), "generic", "val")
    data = SegmentationData(str(root), "generic", "val", ignore_index=65535)
    _, read, _ = data[0]
    assert np.array_equal(read, label.astype(np.int64))
    config = TrainConfig(crop=64, img_scale=(40, 30), ignore_index=65535)
    train = SegmentationData(str(root), "generic", "train", config)
    assert train.ignore_index == 65535
    _, y = train[(0, 0)]
    assert set(y.unique().tolist()) <= {7, 255, 299, 65535} and 255 in y
    assert (y[-1] == 65535).all()  # at most 60 rows after the resize: the last rows are padding
    metrics = SegmentationMetrics(300, data.ignore_index)
    metrics.update(read, read)
    result = metrics.results(data.class_names)
    assert result["per_class"]["class 255"]["IoU"] == 1.0 and result["aAcc"] == 1.0
    assert result["per_class"]["class 0"]["IoU"] is None  # absent from label and prediction


@pytest.mark.slow
def test_a_bad_label_stops_training_with_one_line_naming_it(arch_file, tmp_path, capsys):
    data = make_generic(tmp_path / "g", n=2, splits=False)
    Image.fromarray(np.full((40, 56), 7, dtype=np.uint8)).save(tmp_path / "g" / "labels" / "scene_1.png")
    args = ["train", "--arch", arch_file, "--data", data, "--layout", "generic", "--iters", "2", "--batch-size", "2",
            "--crop", "48", "--device", "cpu", "--work-dir", str(tmp_path / "w"), "--num-workers", "1",
            "--amp", "none"]  # fmt: skip
    assert main(args) == 2
    _assert_error_on_its_own_line(capsys.readouterr().err, "scene_1.png: label value 7 is out of range for 3 classes")


def _assert_error_on_its_own_line(err: str, message: str) -> None:
    """err ends with the error, one line of its own, after the progress bars (tqdm writes \r, then \n on close): the
    error was printed glued to the progress bar's line, and the bar printed again after it when it was collected."""
    lines = err.split("\n")
    assert lines[-1] == "" and lines[-2].startswith("denseclip-fast: error: ") and message in lines[-2], err
    assert "\r" not in lines[-2] and err.count("denseclip-fast: error") == 1, err


@pytest.mark.slow
def test_an_error_in_the_final_evaluation_starts_on_its_own_line(arch_file, tmp_path, capsys):
    """As an error in the training loop (above): the evaluation's bar is closed by the generator tqdm iterates with,
    as the error leaves the loop, and the training's bar before the evaluation starts."""
    data = make_generic(tmp_path / "g", n=4)  # scene_2 and scene_3 are the val split
    path = tmp_path / "g" / "images" / "scene_3.png"
    path.write_bytes(path.read_bytes()[:200])  # its header (the size checks) is whole, its pixels are not
    args = ["train", "--arch", arch_file, "--data", data, "--layout", "generic", "--iters", "1", "--batch-size", "2",
            "--crop", "48", "--device", "cpu", "--work-dir", str(tmp_path / "w"), "--num-workers", "0",
            "--amp", "none"]  # fmt: skip
    assert main(args) == 2
    _assert_error_on_its_own_line(capsys.readouterr().err, "scene_3.png: not a readable image")


def test_config_files_and_errors(arch_file, generic, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"preset: ViT-B/16\ndata: {generic}\nlayout: generic\niters: 10\n")
    cfg = TrainConfig.load(str(path))
    assert cfg.crop is None and cfg.iters == 10 and cfg.arch == "ViT-B/16"  # the arch's crop, when the run starts
    cfg.apply_arch_defaults()
    assert cfg.crop == 640
    assert main(["train", str(path), "--iters", "20", "--accum", "4", "--clip-activation", "gelu",
                 "--warmup-iters", "0", "--print-config"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert (printed["iters"], printed["accum"], printed["crop"], printed["img_scale"]) == (20, 4, 640, [2048, 640])
    assert printed["warmup_iters"] == 0  # the preset's 1500, overridden
    assert printed["clip_activation"] == "gelu"
    switches = tmp_path / "switches.yaml"
    switches.write_text("sync_bn: true\ngrad_checkpointing: false\n")
    assert main(["train", str(switches), "--no-sync-bn", "--grad-checkpointing", "--data", generic,
                 "--print-config"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert (printed["sync_bn"], printed["grad_checkpointing"]) == (False, True)  # the command line wins both ways
    path.write_text("itres: 10\n")
    with pytest.raises(ValueError, match=r"unknown training config keys \['itres'\]"):
        TrainConfig.load(str(path))
    path.write_text("iter: 10\nlrr: 0.1\n")  # the 38 keys listed without a word of which was meant
    with pytest.raises(ValueError, match=re.escape("unknown training config keys ['iter', 'lrr']: did you mean "
                                                   "'iters' for 'iter', 'lr' for 'lrr'? (train --print-config "
                                                   "prints every key)")):  # fmt: skip
        TrainConfig.load(str(path))
    path.write_text("iter: 10\nzzz: 1\n")  # a key like none: the known ones are listed
    with pytest.raises(ValueError, match=re.escape("unknown training config keys ['iter', 'zzz'] (did you mean "
                                                   "'iters' for 'iter'?); known: ['accum', 'amp', ")):  # fmt: skip
        TrainConfig.load(str(path))
    path.write_text("iters: 10\nlr: 0.1\niters: 20\n")  # the last value won without a word
    with pytest.raises(ValueError, match=r"is not valid YAML: the key 'iters' is given twice \(line 3, column 1\)"):
        TrainConfig.load(str(path))
    from denseclip_fast.train.config import _read_yaml

    merged = _read_yaml("x.yaml", io.StringIO("base: &b {lr: 0.5, iters: 7}\nrun:\n  <<: *b\n  lr: 0.25\n"))
    assert merged["run"] == {"lr": 0.25, "iters": 7}  # a merged key may be overridden: no key given twice
    upper = tmp_path / "RUN.YAML"  # read as JSON before
    upper.write_text("iters: 12\n")
    assert TrainConfig.load(str(upper)).iters == 12
    upper.write_text("preset: RN99\n")
    with pytest.raises(ValueError, match=rf"training config {re.escape(repr(str(upper)))}: preset: arch must be one"):
        TrainConfig.load(str(upper))
    with pytest.raises(ValueError, match=re.escape("batch_size (--batch-size) 3 must be divisible by accum (--accum) "
                                                   "2")):  # fmt: skip
        _config(arch_file, generic, tmp_path, batch_size=3, accum=2).validate()
    with pytest.raises(ValueError, match="data directory .* does not exist"):
        _config(arch_file, str(tmp_path / "nowhere"), tmp_path).validate()
    with pytest.raises(ValueError, match=re.escape("arch (--arch) must be one of")):
        _config("RN42", generic, tmp_path).validate()
    for device, message in (("meta", "device must be a CPU or CUDA device"), ("cuda:99", "device is 'cuda:99' but ")):
        with pytest.raises(ValueError, match=re.escape(message)):
            _config(arch_file, generic, tmp_path, device=device).validate()
    # YAML 1.1 reads 1e-4 (no dot) as a string, and 1 as an int: both are the numbers meant
    path.write_text(f"preset: RN50\ndata: {generic}\nlr: 1e-4\nmin_lr: 1e-6\nweight_decay: 1\n")
    cfg = TrainConfig.load(str(path))
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay) == (1e-4, 1e-6, 1.0) and type(cfg.weight_decay) is float
    for text, message in (("lr: fast", "lr must be a number, got 'fast'"), ("iters: 1.5", "iters must be an int"),
                          ("sync_bn: maybe", "sync_bn must be a bool"),
                          ("img_scale: [512]", "img_scale must be a list"),
                          ("channels_last: 2", "channels_last must be a bool or null, got 2")):  # fmt: skip
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig.load(str(path))
    # bad options are one line naming the option (exit 2), before any work; --print-config refuses them the same
    # way rather than print a config train would refuse
    base = ["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--work-dir", str(tmp_path / "x")]
    for extra, message in ((["--checkpoint-interval", "0"], "checkpoint_interval must be an int >= 1, got 0"),
                           (["--log-interval", "0"], "log_interval must be an int >= 1, got 0"),
                           (["--iters", "0"], "iters must be an int >= 1, got 0"),
                           (["--lr", "-1"], "lr must be a finite number > 0 and <= 1, got -1.0"),
                           (["--device", "gpu0"], "--device must be a device such as 'cpu', 'cuda'")):  # fmt: skip
        for printing in ([], ["--print-config"]):
            assert main(base + extra + printing) == 2, (extra, printing)
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and message in err, (extra, printing, err)
    assert main(["train", "--arch", "RN50", "--print-config"]) == 0  # without --data: a template to fill in
    assert json.loads(capsys.readouterr().out)["data"] in (None, "")
    elsewhere = tmp_path / "elsewhere.yaml"  # a config for another machine: its GPU and work dir are not checked here
    (tmp_path / "a_file").write_text("")
    elsewhere.write_text(f"device: cuda:3\nwork_dir: {tmp_path / 'a_file' / 'run'}\n")
    assert main(["train", str(elsewhere), "--print-config"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["device"] == "cuda:3"
    if not torch.cuda.is_available():  # the same GPU given as --device (train itself refuses it, above: gpu0)
        assert main(["train", "--arch", "RN50", "--device", "cuda:3", "--print-config"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["device"] == "cuda:3"
        assert main(["train", "--arch", "RN50", "--device", "cuda:3", "--data", generic]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err
    elsewhere.write_text("device: gpu0\n")  # but what no machine takes is refused
    assert main(["train", str(elsewhere), "--print-config"]) == 2
    assert "device must be a device such as" in capsys.readouterr().err
    absent = str(tmp_path / "absent")
    assert main(["train", "--arch", "RN50", "--data", absent, "--print-config"]) == 2  # a --data given is checked
    assert capsys.readouterr().err == f"denseclip-fast: error: data directory {absent!r} does not exist\n"
    assert not os.path.exists(tmp_path / "x" / "metrics.csv")


def test_a_missing_architecture_file_is_said_to_be_missing(generic, tmp_path, capsys, monkeypatch):
    """An --arch that looks like a file path (a .json name, a folder that exists) and is not there is said not to
    exist, naming it: not that it is no known architecture name; a mistyped name with a "/" is still a name."""
    missing = str(tmp_path / "nope.json")
    assert main(["train", "--arch", missing, "--data", generic, "--print-config"]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: arch (--arch) architecture file {missing!r} does not "
                                       "exist (arch is one of ['RN50', 'RN101', 'ViT-B/16'] or an architecture JSON "
                                       "file)\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    os.makedirs("archs")
    with pytest.raises(ValueError, match=re.escape("architecture file 'archs/tiny' does not exist")):
        _config(os.path.join("archs", "tiny"), generic, tmp_path).validate()  # no .json, but its folder exists
    with pytest.raises(ValueError, match=re.escape(f"architecture file {str(tmp_path)!r} is not a regular file")):
        _config(str(tmp_path), generic, tmp_path).validate()
    with pytest.raises(ValueError, match=re.escape("arch (--arch) must be one of ['RN50', 'RN101', 'ViT-B/16'] or "
                                                   "an architecture JSON file, got 'ViT-B/32'") + "$"):  # fmt: skip
        _config("ViT-B/32", generic, tmp_path).validate()
    for typed, meant in (("rn50", "RN50"), ("ResNet-101", "RN101"), ("vit_b_16", "ViT-B/16")):
        with pytest.raises(ValueError, match=re.escape(f"got {typed!r} (did you mean {meant!r}?)")):
            _config(typed, generic, tmp_path).validate()


def test_an_info_json_output_as_arch_and_init_none_say_what_to_give(arch_file, generic, tmp_path):
    """`denseclip-fast info --json`'s output given as --arch was refused listing its keys as unknown; it is said to
    hold the architecture as its "config" object. init=None in Python (random weights) was "init must be a str":
    the message names 'none'."""
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"checkpoint": "m.safetensors", "classes": CLASSES,
                                "config": json.loads(Path(arch_file).read_text())}))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("denseclip-fast info --json's output: the architecture is its "
                                                   "\"config\" object")):  # fmt: skip
        _config(str(info), generic, tmp_path).validate()
    with pytest.raises(ValueError, match=re.escape("init must be a str (or a path), got NoneType: None ('none' for "
                                                   "random weights)")):  # fmt: skip
        _config(arch_file, generic, tmp_path, init=None).validate()


def test_the_default_worker_count_is_at_most_the_cpus_and_a_given_one_stays(generic, tmp_path, monkeypatch, capsys):
    """4 DataLoader workers on a 2-core machine made PyTorch warn, twice, that they may slow the run: left unset
    (None, printed and saved as null, so that a resume elsewhere takes that machine's), the count is 4 or the
    process's share of the CPUs it may use (among torchrun's processes on the machine) where fewer; one given
    (--num-workers, a config file) is taken as it is."""
    from denseclip_fast.train import config as config_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert config_module.default_num_workers() == 2 and TrainConfig().workers() == 2
    assert train_preset("RN50").num_workers is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert TrainConfig().workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's 8 processes on this machine share its 16 CPUs
    assert TrainConfig().workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more processes than CPUs: still one worker each
    assert TrainConfig().workers() == 1
    # torchrun --numa-binding=exclusive bound each of its 8 processes to 4 of the launcher's 32 CPUs: that is its
    # share already, not to be divided again (4 // 8 was 1 worker)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)) if pid else set(range(4)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert TrainConfig().workers() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert TrainConfig().workers() == 1
    path = tmp_path / "run.yaml"
    path.write_text(f"preset: RN50\ndata: {generic}\nnum_workers: 6\n")
    assert TrainConfig.load(str(path)).workers() == 6  # a file's value, more than the machine's CPUs: as given
    assert main(["train", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["num_workers"] == 6
    assert main(["train", str(path), "--num-workers", "0", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["num_workers"] == 0
    path.write_text(f"preset: RN50\ndata: {generic}\nnum_workers: null\n")
    assert main(["train", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["num_workers"] is None
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--num-workers NUM_WORKERS DataLoader workers per process (default: 4, or the process's share of the " \
           "CPUs it may use, among torchrun's processes on the machine, where fewer)" in help_text  # fmt: skip


def test_extra_is_notes_kept_with_the_run_and_must_be_json(generic, tmp_path, capsys):
    """extra is free-form notes: read by nothing, printed and saved with the config (config.json, the states). A
    value JSON cannot hold (YAML reads 2024-01-01 as a date) is refused naming extra, before any work; it was a
    TypeError traceback when the config was printed or config.json written."""
    path = tmp_path / "run.yaml"
    base = f"preset: RN50\ndata: {generic}\nlayout: generic\nwork_dir: {tmp_path / 'w'}\n"
    path.write_text(base + "extra: {note: lr sweep, when: '2024-01-01'}\n")
    assert main(["train", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["extra"] == {"note": "lr sweep", "when": "2024-01-01"}
    path.write_text(base + "extra: {when: 2024-01-01}\n")
    assert main(["train", str(path), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("denseclip-fast: error: extra (notes saved in config.json) must hold JSON values "
                                 "(strings, finite numbers, true/false, null, lists, mappings; quote a YAML date): "
                                 "Object of type date is not JSON serializable\n")  # fmt: skip
    path.write_text(base + "extra: {loss: .nan}\n")  # config.json held NaN, which JSON readers other than Python refuse
    assert main(["train", str(path), "--print-config"]) == 2
    assert "finite numbers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def test_a_yaml_config_whose_aliases_expand_past_a_bound_is_refused_naming_the_file(tmp_path, capsys):
    """Nine lines of aliases of aliases hold 1e9 values: printing the config or writing config.json spelled them out
    until memory ran out, with no word of the file. Aliases within the bound (merge keys) still work."""
    lines = ["extra:", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["train", str(path), "--print-config"]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: training config {str(path)!r} holds more than 100000 "
                                       "values once its YAML aliases are expanded (aliases of aliases multiply)\n")
    path.write_text("\n".join(lines[:5]) + "\n")  # about 12,000 values: fine
    assert main(["train", str(path), "--print-config"]) == 0
    assert len(json.loads(capsys.readouterr().out)["extra"]["a3"][9][9]) == 10


def test_work_dirs_and_resume_refuse_what_would_lose_or_mix_runs(arch_file, generic, tmp_path):
    """A fresh run in another run's work dir is refused (pruning by iteration number would delete its newest
    checkpoints, its metrics would mix with theirs); --resume auto naming a deleted state, and resuming with another
    batch size (the data order resumes by images seen), are errors that say what to do."""
    cfg = _config(arch_file, generic, tmp_path / "w", iters=2, checkpoint_interval=1)
    train(cfg)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(iter_1.safetensors, iter_1.state.pt, iter_2.s"
                                         r"afetensors, iter_2.state.pt, latest.json\): continue their run with "
                                         r"--resume auto, or start"):  # fmt: skip
        train(cfg)
    with pytest.raises(ValueError, match=r"resume with --batch-size 2"):
        train(_config(arch_file, generic, tmp_path / "w", iters=3, batch_size=4), resume="auto")
    os.remove(tmp_path / "w" / "iter_2.state.pt")
    with pytest.raises(ValueError, match=r"names .*iter_2.state.pt, which does not exist"):
        train(cfg, resume="auto")


@pytest.mark.slow
def test_another_work_dirs_state_resumes_into_an_empty_work_dir_only(arch_file, generic, tmp_path):
    """--resume FILE of another work dir into one that holds a run: refused before anything is written (its logs
    were cut at FILE's iteration, its eval files removed, and its later checkpoints pruned the new run's own as soon
    as it saved); into a work dir without checkpoints the run goes on there."""
    one = _config(arch_file, generic, tmp_path / "one", iters=2, checkpoint_interval=1)
    two = _config(arch_file, generic, tmp_path / "two", iters=4, checkpoint_interval=1)
    train(one)
    train(two)
    before = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir() if p.is_file()}
    state = str(tmp_path / "one" / "iter_1.state.pt")
    with pytest.raises(ValueError, match=rf"--resume {re.escape(state)} is a state of another work dir "
                                         rf"\({re.escape(str(tmp_path / 'one'))}\), and work_dir .*two' holds another "
                                         r"run's checkpoints"):  # fmt: skip
        train(dataclasses.replace(two, iters=3), resume=state)
    assert {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir() if p.is_file()} == before
    fork = dataclasses.replace(one, work_dir=str(tmp_path / "fork"), iters=3)
    train(fork, resume=state)  # a work dir without checkpoints: the run goes on there, from iteration 1
    assert [row["iter"] for row in _metrics(tmp_path / "fork")] == ["2", "3"]
    assert os.path.isfile(tmp_path / "fork" / "iter_3.safetensors")


def test_a_training_state_given_as_a_model_points_to_the_weights_beside_it(arch_file, generic, tmp_path):
    """load_checkpoint (eval --checkpoint, segment ...) of an iter_N.state.pt listed its entries as 'not tensors';
    train --init (CLIP weights or a DenseCLIP checkpoint: a run of this trainer's) said 'not CLIP weights'."""
    cfg = _config(arch_file, generic, tmp_path / "w", iters=1, checkpoint_interval=1)
    train(cfg)
    state = tmp_path / "w" / "iter_1.state.pt"
    weights = re.escape(str(tmp_path / "w" / "iter_1.safetensors"))
    match = (r"iter_1.state.pt: a training state \(iteration, optimizer, random state\), not a model: the model is the "
             rf"weights file saved beside it, {weights}$")  # fmt: skip
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(state)
    with pytest.raises(CheckpointError, match=match):
        build_model(dataclasses.replace(cfg, init=str(state)), CLASSES)


@pytest.mark.slow
def test_a_resume_may_switch_to_fp16(arch_file, generic, tmp_path):
    """A run saved without fp16 has an empty gradient scaler state, which GradScaler.load_state_dict refuses with a
    RuntimeError: resumed with amp fp16, the scaler starts afresh."""
    cfg = _config(arch_file, generic, tmp_path / "w", iters=2, checkpoint_interval=1)
    train(cfg)
    train(dataclasses.replace(cfg, iters=3, amp="fp16"), resume="auto")
    assert [row["iter"] for row in _metrics(tmp_path / "w")] == ["1", "2", "3"]


def test_resume_auto_without_latest_json_says_what_it_found(arch_file, generic, tmp_path):
    """--resume auto in a work dir with checkpoints but no latest.json (a run killed during its first save, a
    deleted file) advised "continue it with --resume auto", what had just been done. It now says that no resumable
    state was found, which files are there, and the newest state that --resume FILE takes (which works); a fresh
    start gives the same advice, and where no state can be resumed says so rather than advise --resume auto."""
    cfg = _config(arch_file, generic, tmp_path / "w", iters=2, checkpoint_interval=1)
    train(cfg)
    os.remove(tmp_path / "w" / "latest.json")
    state = str(tmp_path / "w" / "iter_2.state.pt")
    found = r"--resume auto: work_dir .* has no latest.json, so no resumable state was found, but it holds checkpoint "
    with pytest.raises(ValueError, match=found + r"files \(iter_1.safetensors, iter_1.state.pt, iter_2.safetensors, "
                       rf"iter_2.state.pt\): name the newest state explicitly with --resume {re.escape(state)}, or "
                       r"start this run in a new --work-dir \(or delete those files\)$") as err:  # fmt: skip
        train(cfg, resume="auto")
    assert "continue it with --resume auto" not in str(err.value)
    advised = r"already holds checkpoints \(.*iter_2.state.pt\) but no latest.json: continue their run with --resume "
    with pytest.raises(ValueError, match=advised + rf"{re.escape(state)}, or start"):
        train(cfg)  # a fresh start gives the same advice
    assert train(dataclasses.replace(cfg, iters=3), resume=state)["iterations"] == 3
    for name in ("latest.json", "iter_1.state.pt", "iter_2.state.pt", "iter_3.state.pt"):
        os.remove(tmp_path / "w" / name)
    with pytest.raises(ValueError, match=found + r"files \(iter_1.safetensors, iter_2.safetensors, iter_3.safetensors"
                       r"\): none is an iter_N.state.pt beside its iter_N.safetensors, so none can be resumed: start "
                       r"this run in a new --work-dir"):  # fmt: skip
        train(cfg, resume="auto")
    # a fresh start into it (e.g. the same command again after a run killed during its first save) was told "holds
    # another run's checkpoints: continue it with --resume auto", which then said that none can be resumed
    with pytest.raises(ValueError, match=r"work_dir .* holds checkpoint files that cannot be resumed \(iter_1.safetens"
                                         r"ors, iter_2.safetensors, iter_3.safetensors: no iter_N.state.pt beside an "
                                         r"iter_N.safetensors, as a run stopped during its first save leaves\): delete "
                                         r"them \(a model file may be worth keeping elsewhere\), or start this run in "
                                         r"a new --work-dir$") as err:  # fmt: skip
        train(cfg)
    assert "--resume" not in str(err.value) and "another run" not in str(err.value)


def test_a_refused_resume_leaves_the_work_dir_as_it_was(arch_file, generic, tmp_path):
    """The resume checks come before anything is written: a refused resume (here with another batch size) rewrote
    config.json, which then described a run that never trained, and created a new work dir it never used."""
    train(_config(arch_file, generic, tmp_path / "w", iters=2, checkpoint_interval=2))
    (tmp_path / "w" / ".iter_4.state.pt.9.0123abcd.partial").write_bytes(b"left by a killed run")
    files = lambda: {n: (tmp_path / "w" / n).read_bytes() for n in os.listdir(tmp_path / "w")}  # noqa: E731
    before = files()
    with pytest.raises(ValueError, match=r"resume with --batch-size 2"):
        train(_config(arch_file, generic, tmp_path / "w", iters=4, batch_size=4), resume="auto")
    assert files() == before
    with pytest.raises(ValueError, match=r"resume with --batch-size 2"):
        train(_config(arch_file, generic, tmp_path / "new", batch_size=4), 
              resume=str(tmp_path / "w" / "iter_2.state.pt"))  # fmt: skip
    assert not os.path.exists(tmp_path / "new")


def test_resume_with_another_architecture_norm_decay_or_classes_is_one_line(arch_file, generic, tmp_path, capsys):
    """Resuming with weights of other shapes (another fpn_channels in the arch file) was load_state_dict's
    RuntimeError traceback, with another norm_decay torch's bare 'loaded state dict has a different number of
    parameter groups', with another class count 'class_names has 4 names but the checkpoint's head has 3 outputs':
    each is now one line naming the state file, the saved and the given setting, before anything is written."""
    train(_config(arch_file, generic, tmp_path / "a", iters=2, checkpoint_interval=2))
    state = str(tmp_path / "a" / "iter_2.state.pt")
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**json.loads(Path(arch_file).read_text()), "fpn_channels": 32}))
    four = make_generic(tmp_path / "four", n=4)
    (tmp_path / "four" / "classes.txt").write_text("\n".join([*CLASSES, "tree"]) + "\n")
    wide_arch = rf"arch '{re.escape(arch_file)}' \(fpn_channels 16\), this one has '{re.escape(str(wide))}' "
    cases = ((dict(arch=str(wide)), wide_arch + r"\(fpn_channels 32\): .* new --work-dir"),
             (dict(norm_decay="official"), r"norm_decay 'all', this one has 'official': .*with norm_decay 'all'"),
             (dict(data=four), r"3 classes, this one's data set \(.*four\) has 4: resume with the saved"))  # fmt: skip
    for change, message in cases:
        with pytest.raises(ValueError, match=rf"^{re.escape(state)} was saved by a run with {message}"):
            train(dataclasses.replace(_config(arch_file, generic, tmp_path / "b"), **change), resume=state)
        assert not os.path.exists(tmp_path / "b"), change
    capsys.readouterr()
    assert main(["train", "--arch", str(wide), "--data", generic, "--layout", "generic", "--batch-size", "2",
                 "--device", "cpu", "--work-dir", str(tmp_path / "b"), "--resume", state]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(fpn_channels 16), this one has" in err, err
    # a state saved before norm_decay existed: what its optimizer groups hold is compared
    old = torch.load(state, weights_only=True)
    old["config"] = json.dumps({k: v for k, v in json.loads(old["config"]).items() if k != "norm_decay"})
    torch.save(old, tmp_path / "a" / "iter_2.state.pt")
    with pytest.raises(CheckpointError, match=r"iter_2.state.pt: cannot resume from it: its optimizer state does not "
                                              r"fit this run's parameters: 4 parameter groups were saved, this run "
                                              r"has 3"):  # fmt: skip
        train(_config(arch_file, generic, tmp_path / "b", norm_decay="official"), resume=state)
    assert not os.path.exists(tmp_path / "b")


def test_a_saved_optimizer_state_of_other_parameters_says_how_they_differ():
    """Saved parameter groups naming a parameter this run lacks, the same names in another order, or (no names
    saved) another count: each named, before torch's load_state_dict, whose error names neither group nor parameter
    (and which takes same-sized groups of other parameters without a word)."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([{"params": [a, b], "names": ["a", "b"]}])
    sizes = "parameter group 0 was saved with 2 parameters, this run's has 2"
    for group, difference in (({"params": [0, 1], "names": ["a", "c"]}, f"{sizes} (e.g. c is in only one of them)"),
                              ({"params": [0, 1], "names": ["b", "a"]}, f"{sizes} (in another order)"),
                              ({"params": [0]}, sizes.replace("with 2", "with 1"))):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(f"its optimizer state does not fit this run's parameters: "
                                                       f"{difference}")):  # fmt: skip
            load_optimizer_state(optimizer, {"state": {}, "param_groups": [group]})
    load_optimizer_state(optimizer, {"state": {}, "param_groups": [{"params": [0, 1], "names": ["a", "b"]}]})


def test_a_resume_with_reordered_classes_is_refused_and_renamed_ones_said(arch_file, generic, tmp_path, capsys):
    """A data set whose classes.txt lists the saved run's classes in another order resumed without a word: the head's
    outputs and the labels swapped meanings. It is refused; a renamed class (a reworded prompt) goes on, said."""
    train(_config(arch_file, generic, tmp_path / "a", iters=2, checkpoint_interval=2))
    state = str(tmp_path / "a" / "iter_2.state.pt")
    reordered = make_generic(tmp_path / "reordered")
    (tmp_path / "reordered" / "classes.txt").write_text("\n".join([CLASSES[1], CLASSES[0], *CLASSES[2:]]) + "\n")
    message = (rf"^{re.escape(state)} was saved by a run whose classes are in another order than this data set's "
               rf"\(.*reordered\): class 0 was {CLASSES[0]!r} and is {CLASSES[1]!r}, the saved run's class 1; .* new "
               r"--work-dir$")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train(_config(arch_file, reordered, tmp_path / "b"), resume=state)
    assert not os.path.exists(tmp_path / "b")
    # swapped and another renamed: still a reorder (sorted names differ, which let it through)
    (tmp_path / "reordered" / "classes.txt").write_text("\n".join([CLASSES[1], CLASSES[0], "meadow"]) + "\n")
    with pytest.raises(ValueError, match=message):
        train(_config(arch_file, reordered, tmp_path / "b"), resume=state)
    renamed = make_generic(tmp_path / "renamed")
    names = [*CLASSES[:-1], "meadow"]
    (tmp_path / "renamed" / "classes.txt").write_text("\n".join(names) + "\n")
    capsys.readouterr()
    train(_config(arch_file, renamed, tmp_path / "c"), resume=state)
    err = capsys.readouterr().err
    assert f"with class names other than the saved run's ({len(CLASSES) - 1}: {CLASSES[-1]!r} -> 'meadow')" \
        in err, err
    assert _final(tmp_path / "c", 4).class_names == names


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch denseclip_fast_pwned_marker",))


def test_resume_files_that_are_not_training_states_are_named(arch_file, generic, tmp_path, monkeypatch, capsys):
    """--resume of a crafted zip surfaced torch's UnpicklingError, whose text advises loading with weights_only=False;
    of a text file a KeyError: 101, of a model .safetensors a KeyError: 'config'. Each is now one line naming the file
    and what a resume file is; nothing of the file runs."""
    from denseclip_fast import DenseCLIP
    from denseclip_fast.train.state import read_train_state

    monkeypatch.chdir(tmp_path)
    evil, text, model, partial = (tmp_path / n for n in ("evil.state.pt", "notes.txt", "m.safetensors", "p.state.pt"))
    torch.save({"iteration": 2, "rng": [_Evil()]}, evil)
    text.write_text("hello\n")
    DenseCLIP(tiny_config("resnet"), ["sky", "road"]).save(model)
    torch.save({"iteration": 2, "optimizer": {}, "scaler": {}, "rng": [{"cpu": torch.zeros(2)}], "config": "{"},
               partial)  # fmt: skip
    listed, seeded = tmp_path / "l.state.pt", tmp_path / "r.state.pt"
    torch.save([1, 2], listed)
    torch.save({"iteration": 2, "optimizer": {}, "scaler": {}, "rng": [{"cuda": torch.zeros(2)}], "config": "{}"},
               seeded)  # an rng entry without the CPU generator's state  # fmt: skip
    cases = ((evil, r"cannot resume from it \(refused: loading it would execute code \(it references posix.system"),
             (text, r"cannot resume from it \(not a checkpoint: unrecognised format"),
             (model, r"cannot resume from it: it is a .safetensors model file"),
             (partial, r"cannot resume from it: missing or malformed entries config \(a JSON object\)"),
             (listed, r"cannot resume from it: it holds a list;"),
             (seeded, r"cannot resume from it: missing or malformed entries rng \(a list of \{'cpu': tensor, "
                      r"\.\.\.\}\)"))  # fmt: skip
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match) as err:
            read_train_state(str(path))
        message = str(err.value)
        assert message.startswith(f"{path}: ") and message.endswith("--resume takes a training state file: the "
                                                                    "iter_N.state.pt that train writes beside each "
                                                                    "iter_N.safetensors")  # fmt: skip
        assert "weights_only" not in message
    base = ["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--device", "cpu",
            "--work-dir", str(tmp_path / "w"), "--num-workers", "0"]  # fmt: skip
    assert main([*base, "--resume", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil.state.pt: cannot resume from it" in err and "weights_only" not in err
    assert not (tmp_path / "denseclip_fast_pwned_marker").exists()
    os.makedirs(tmp_path / "w", exist_ok=True)
    (tmp_path / "w" / "latest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--resume auto: .*latest.json is damaged \(KeyError: 'state'\)"):
        train(_config(arch_file, generic, tmp_path / "w"), resume="auto")


@pytest.mark.parametrize(
    "env, message",
    [({"RANK": "1"}, "RANK='1' is set but WORLD_SIZE is not: set both (as torchrun does) or neither"),
     ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2' must be below WORLD_SIZE='2' (ranks are 0..WORLD_SIZE-1)"),
     ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1 (the number of processes)"),
     ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be a non-negative integer"),
     ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK='-1' must be a non-negative integer"),
     ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' must be a non-negative integer"),
     ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set but RANK is not")],
)  # fmt: skip
def test_torchrun_variables_are_checked_naming_the_variable(arch_file, generic, tmp_path, monkeypatch, capsys, env,
                                                            message):  # fmt: skip
    """RANK=1 without WORLD_SIZE ran the whole run as rank 1, which saves nothing (exit 0, an empty work dir);
    RANK >= WORLD_SIZE was an IndexError traceback in the sampler, WORLD_SIZE=0 a ZeroDivisionError, and a value that
    is not a number "invalid literal for int()" naming no variable. Each is one line naming the variable and its
    value, before any work."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(f"environment variable {message}")):
        train(_config(arch_file, generic, tmp_path / "w"))
    assert main(["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--device", "cpu",
                 "--work-dir", str(tmp_path / "w")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"denseclip-fast: error: environment variable {message}"), err
    assert not os.path.exists(tmp_path / "w")
    assert main(["train", "--arch", arch_file, "--print-config"]) == 2  # it prints only what train would start
    assert capsys.readouterr().err.startswith(f"denseclip-fast: error: environment variable {message}")


def test_torchrun_variables_that_are_consistent_are_read():
    from denseclip_fast.train.launch import launch_environment

    assert launch_environment({}) == (0, 1, 0)
    assert launch_environment({"WORLD_SIZE": "1"}) == (0, 1, 0)
    assert launch_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: no work dir lock")
def test_a_work_dir_in_use_by_another_run_is_refused(arch_file, generic, tmp_path, monkeypatch):
    """Two runs in one work dir at once interleaved metrics.csv and overwrote each other's checkpoints, and each
    start deleted every .partial file (maybe the other's checkpoint being saved). Rank 0 now holds a flock on
    .lock for the whole run, taken before anything is written or removed; a second run is one line naming the work
    dir and the holder's PID. The lock is released when train returns or raises (here a held lock stands for the
    other process: flock locks of two open() calls exclude each other in one process too)."""
    import fcntl

    work = tmp_path / "w"
    cfg = _config(arch_file, generic, work, iters=2, checkpoint_interval=1)
    os.makedirs(work)
    partial = work / ".iter_2.state.pt.9.0123abcd.partial"
    partial.write_bytes(b"another run's checkpoint, being saved")
    with open(work / ".lock", "w") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        with pytest.raises(ValueError, match=rf"^work dir {re.escape(repr(str(work)))} is in use by another run "
                                             r"\(PID 4242\): wait for it to end, or start this run in another "
                                             r"--work-dir$"):  # fmt: skip
            train(cfg)
    assert sorted(os.listdir(work)) == [".iter_2.state.pt.9.0123abcd.partial", ".lock"]

    def free() -> bool:
        with open(work / ".lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    held = []
    real_save = Trainer._save

    def save(self, *args):  # the lock is held while the run saves
        held.append(not free() and (work / ".lock").read_text() == f"{os.getpid()}\n")
        real_save(self, *args)

    monkeypatch.setattr(Trainer, "_save", save)
    train(cfg)
    assert held == [True, True] and free() and not partial.exists()
    monkeypatch.setattr(Trainer, "_save", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(dataclasses.replace(cfg, iters=3), resume="auto")
    assert free()
    monkeypatch.setattr(Trainer, "_save", real_save)
    monkeypatch.setattr(fcntl, "flock", lambda *args: (_ for _ in ()).throw(OSError(37, "No locks available")))
    with pytest.warns(UserWarning, match=r"cannot lock .*\.lock \(No locks available\): nothing keeps another run"):
        train(dataclasses.replace(cfg, iters=3), resume="auto")  # a file system without flock: the run goes on


def test_resume_auto_is_refused_when_the_work_dir_moved_on_before_it_held_it(arch_file, generic, tmp_path,
                                                                              monkeypatch):  # fmt: skip
    """--resume auto picks its state from latest.json before it holds the work dir's lock; if another run saved a
    newer checkpoint meanwhile, this run would resume the older one and prune that run's logs. Checked again under
    the lock: refused, nothing written."""
    work = tmp_path / "w"
    cfg = _config(arch_file, generic, work, iters=2, checkpoint_interval=1)
    train(cfg)
    with open(work / "latest.json") as f:
        latest = json.load(f)
    assert latest["state"] == "iter_2.state.pt"
    real_load = Trainer._load

    def load(self, *args, **kwargs):  # another run saves iter_3 while this one loads iter_2
        shutil.copy(work / "iter_2.state.pt", work / "iter_3.state.pt")
        with open(work / "latest.json", "w") as f:
            json.dump({**latest, "state": "iter_3.state.pt"}, f)
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_load", load)
    before = (work / "metrics.csv").read_bytes()
    moved = r"--resume auto: work dir .* moved on while this run started \(latest.json named .*iter_2.state.pt, now "
    with pytest.raises(ValueError, match=moved + r".*iter_3.state.pt: another run\?\)"):
        train(dataclasses.replace(cfg, iters=4), resume="auto")
    assert (work / "metrics.csv").read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked DataLoader workers")
def test_a_killed_runs_lock_is_not_kept_by_its_dataloader_workers(tmp_path):
    """The flock belongs to the open file, which forked DataLoader workers share: a run killed outright (SIGKILL,
    the OOM killer) kept its work dir locked until its workers noticed (5 s), and a supervisor's immediate
    --resume auto was refused. The workers close their copy as they start (the loader's worker_init_fn). Here a
    process takes the lock, forks a 'worker' that runs that function and lives on, and is killed: the lock is free
    at once."""
    program = f"""
import os, signal, time
from denseclip_fast.train.workdir import work_dir_lock
with work_dir_lock({str(tmp_path)!r}) as worker_init:
    if os.fork() == 0:
        worker_init(0)
        time.sleep(3)
        os._exit(0)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    run = subprocess.run([sys.executable, "-c", program], env=with_root_on_path(), timeout=60)
    assert run.returncode == -signal.SIGKILL
    with work_dir_lock(str(tmp_path)) as worker_init:  # a ValueError 'in use by another run' without the fix
        assert worker_init is not None


def test_the_training_loader_closes_the_lock_in_its_workers(arch_file, generic, tmp_path, monkeypatch):
    """The training DataLoader gets the lock's worker_init_fn (the test above checks what it does)."""
    from denseclip_fast.train import loop, workdir

    given = []

    class Loader(loop.DataLoader):  # type: ignore[misc]
        def __init__(self, *args, **kwargs):
            given.append(kwargs.get("worker_init_fn"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop, "DataLoader", Loader)
    train(_config(arch_file, generic, tmp_path / "w", iters=1))
    assert len(given) == 1 and isinstance(given[0], functools.partial) and given[0].func is workdir._close_copy


@pytest.mark.slow
def test_workers_started_by_forkserver_train_as_the_process_alone(arch_file, generic, tmp_path):
    """The same run with no DataLoader worker and with two started by forkserver, Python 3.14's default start
    method on Linux (a worker gets the data set and the lock's worker_init_fn pickled, not forked; spawn is the same
    there): the same losses and the same final weights, so neither the worker count nor the start method changes a
    run (each sample's draws come from the seed and its index)."""
    alone = _config(arch_file, generic, tmp_path / "alone", iters=2, checkpoint_interval=2, eval_interval=0)
    train(alone)
    workers = dataclasses.replace(alone, work_dir=str(tmp_path / "workers"), num_workers=2)
    (tmp_path / "workers.json").write_text(json.dumps(workers.to_dict()))
    script = tmp_path / "run.py"  # forkserver imports the main module in each worker: a file, not -c
    script.write_text("import multiprocessing, sys\n"
                      "if __name__ == '__main__':\n"
                      "    multiprocessing.set_start_method('forkserver')\n"
                      "    from denseclip_fast.train import TrainConfig, train\n"
                      "    train(TrainConfig.load(sys.argv[1]))\n")  # fmt: skip
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "workers.json")], timeout=300,
                         env=with_root_on_path(), capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    columns = ("iter", "loss", "loss_decode", "loss_aux")
    alone_rows, workers_rows = _metrics(tmp_path / "alone"), _metrics(tmp_path / "workers")
    assert [[r[k] for k in columns] for r in alone_rows] == [[r[k] for k in columns] for r in workers_rows]
    want, got = _final(tmp_path / "alone", 2).state_dict(), _final(tmp_path / "workers", 2).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


class _Killed(Exception):
    """Stands for a kill at a save: the files written until then stay as a killed run leaves them."""


def _killed_at_save(monkeypatch, iteration: int) -> None:
    """Trainer._save saves as usual until ``iteration``, where the run stops (before writing anything of it)."""
    real_save = Trainer._save

    def save(self, model, optimizer, scaler, done, rng):
        if done == iteration:
            raise _Killed(done)
        real_save(self, model, optimizer, scaler, done, rng)

    monkeypatch.setattr(Trainer, "_save", save)


def test_a_fresh_run_starts_over_the_logs_of_a_run_killed_before_its_first_checkpoint(arch_file, generic, tmp_path,
                                                                                      monkeypatch, capsys):  # fmt: skip
    """A run killed before its first checkpoint left metrics.csv, eval.csv, eval_iter_N.json and TensorBoard events;
    a fresh run in that work dir (allowed: nothing there can be resumed) appended to them, so metrics.csv went
    1, 2, 1, 2, 3, 4. It now moves them into previous_logs_1/ (they may be a finished run's whose checkpoints were
    deleted) and says so in one line."""
    cfg = _config(arch_file, generic, tmp_path / "w", eval_interval=1, tensorboard=importlib.util.find_spec(
        "tensorboard") is not None)  # fmt: skip
    _killed_at_save(monkeypatch, 2)
    with pytest.raises(_Killed):
        train(cfg)
    left = sorted(os.listdir(tmp_path / "w"))
    assert [n for n in left if n != "tensorboard"] == [".lock", "config.json", "eval.csv", "eval_iter_1.json",
                                                       "metrics.csv"]  # fmt: skip
    monkeypatch.undo()
    capsys.readouterr()
    train(dataclasses.replace(cfg, eval_interval=3))
    err = capsys.readouterr().err
    said = [line for line in err.replace("\r", "\n").splitlines() if "held logs" in line]
    # (config.json last: after the events with TensorBoard, in "and 1 more")
    fourth = "tensorboard/events.out.tfevents." if cfg.tensorboard else "config.json to previous_logs_1/"
    assert len(said) == 1 and said[0].startswith(
        f"denseclip-fast train: work dir {str(tmp_path / 'w')!r} held logs but no checkpoint (a run stopped before its "
        f"first save, or checkpoints deleted): moved metrics.csv, eval.csv, eval_iter_1.json, {fourth}"), said
    assert said[0].endswith(" to previous_logs_1/; this run starts the logs over")
    aside = tmp_path / "w" / "previous_logs_1"
    assert [int(r["iter"]) for r in _metrics(aside)] == [1, 2] and (aside / "eval_iter_1.json").is_file()
    with open(aside / "config.json") as f:  # the settings of those logs, not the new run's
        assert json.load(f)["eval_interval"] == 1
    assert [int(r["iter"]) for r in _metrics(tmp_path / "w")] == [1, 2, 3, 4]
    with open(tmp_path / "w" / "eval.csv", newline="") as f:
        assert [int(r["iter"]) for r in csv.DictReader(f)] == [3, 4]
    assert not os.path.exists(tmp_path / "w" / "eval_iter_1.json")
    if cfg.tensorboard:
        assert len(os.listdir(tmp_path / "w" / "tensorboard")) == 1


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="a second file system")
def test_old_logs_are_moved_aside_across_file_systems(arch_file, generic, tmp_path, capsys):
    """tensorboard/ may be a link to a folder on another file system (a shared log folder), where os.replace cannot
    move its events: the move failed halfway, and every later fresh run failed the same way."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as elsewhere:
        if os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the work dir's file system here")
        work = tmp_path / "w"
        work.mkdir()
        (work / "metrics.csv").write_text("iter,loss\n1,2.0\n")
        os.symlink(elsewhere, work / "tensorboard")
        (work / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"events")
        Trainer(_config(arch_file, generic, work))._start_logs_over()
        assert sorted(os.listdir(work / "previous_logs_1")) == ["metrics.csv", "tensorboard"]
        assert (work / "previous_logs_1" / "tensorboard" / "events.out.tfevents.1.host").read_bytes() == b"events"
        assert os.listdir(elsewhere) == [] and not (work / "metrics.csv").exists()


def test_logs_moved_aside_again_go_to_the_next_free_folder_and_only_events_files_move(arch_file, generic, tmp_path):
    """With previous_logs_1/ there (an earlier move), the logs go to previous_logs_2/, the first left as it was; in
    tensorboard/ only the events files move (another tool's file there stays)."""
    work = tmp_path / "w"
    (work / "previous_logs_1").mkdir(parents=True)
    (work / "previous_logs_1" / "metrics.csv").write_text("iter,loss\n1,9.0\n")
    (work / "metrics.csv").write_text("iter,loss\n1,2.0\n")
    (work / "tensorboard").mkdir()
    (work / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"events")
    (work / "tensorboard" / "projector_config.pbtxt").write_text("embeddings {}\n")
    Trainer(_config(arch_file, generic, work))._start_logs_over()
    assert sorted(os.listdir(work / "previous_logs_2")) == ["metrics.csv", "tensorboard"]
    assert os.listdir(work / "previous_logs_2" / "tensorboard") == ["events.out.tfevents.1.host"]
    assert os.listdir(work / "tensorboard") == ["projector_config.pbtxt"]
    assert (work / "previous_logs_1" / "metrics.csv").read_text() == "iter,loss\n1,9.0\n"
    assert (work / "previous_logs_2" / "metrics.csv").read_text() == "iter,loss\n1,2.0\n"


def test_a_saved_evaluation_file_that_holds_none_reads_as_missing(arch_file, generic, tmp_path):
    """An eval_iter_N.json that is damaged (not JSON, not UTF-8), not an object, or without mIoU reads as no saved
    evaluation (a complete run resumed then evaluates again), not as an error or as metrics; a metric written as
    null reads as NaN."""
    work = tmp_path / "w"
    work.mkdir()
    trainer = Trainer(_config(arch_file, generic, work))
    saved = work / "eval_iter_4.json"
    for content in (b'{"mIoU": 0.5', b"[0.5]", b'{"aAcc": 0.9}', b'{"mIoU": "\xff"}'):
        saved.write_bytes(content)
        assert trainer._saved_evaluation(4) is None, content
    saved.write_text('{"mIoU": 0.5, "aAcc": null}')
    evaluation = trainer._saved_evaluation(4)
    assert evaluation is not None and evaluation["mIoU"] == 0.5 and math.isnan(evaluation["aAcc"])


def test_a_resume_keeps_the_logs_up_to_its_checkpoint_only(arch_file, generic, tmp_path, monkeypatch):
    """The rows that a killed run logged after its last checkpoint are dropped when it is resumed: the resumed run
    logs those iterations again, each once. Its eval_iter_N.json after the checkpoint go too (they evaluated weights
    that were never saved); they stayed, though a resume with another eval_interval would not write them again."""
    cfg = _config(arch_file, generic, tmp_path / "w", eval_interval=1)
    _killed_at_save(monkeypatch, 4)
    with pytest.raises(_Killed):
        train(cfg)
    assert [int(r["iter"]) for r in _metrics(tmp_path / "w")] == [1, 2, 3, 4]
    assert os.path.exists(tmp_path / "w" / "eval_iter_3.json")
    monkeypatch.undo()
    train(dataclasses.replace(cfg, eval_interval=0), resume="auto")
    assert [int(r["iter"]) for r in _metrics(tmp_path / "w")] == [1, 2, 3, 4]
    with open(tmp_path / "w" / "eval.csv", newline="") as f:
        assert [int(r["iter"]) for r in csv.DictReader(f)] == [1, 2, 4]
    assert sorted(n for n in os.listdir(tmp_path / "w") if n.startswith("eval_iter_")) == [
        f"eval_iter_{i}.json" for i in (1, 2, 4)]  # fmt: skip


def test_resuming_a_complete_run_says_so_and_a_smaller_iters_is_refused(arch_file, generic, tmp_path, capsys):
    """--resume auto on a run that had reached its iterations printed nothing and exited 0; with a smaller --iters it
    said "resuming" and rewrote config.json with it. It now says in one line that the run is complete, writes
    nothing and returns (the CLI prints) the run's final evaluation; a smaller iters is refused (a run cannot go
    back); a run stopped before its final evaluation gets it (once in eval.csv), config.json left as it was."""
    work = tmp_path / "w"
    cfg = _config(arch_file, generic, work, iters=2, checkpoint_interval=2)
    first = train(cfg)
    files = lambda: {n: (work / n).read_bytes() for n in os.listdir(work) if n != "tensorboard"}  # noqa: E731
    before = files()
    capsys.readouterr()
    result = train(dataclasses.replace(cfg, lr=5e-4), resume="auto")
    err = capsys.readouterr().err
    assert err == (f"denseclip-fast train: the run in work dir {str(work)!r} is already complete at iteration 2 "
                   f"({work / 'iter_2.state.pt'}; its final evaluation is eval_iter_2.json): nothing to train; give "
                   "iters above 2 (--iters) to train on; the settings given that differ from the run's (lr) are not "
                   "used\n")  # fmt: skip
    assert result == {"iterations": 2, "last": {}, "eval": first["eval"]} and files() == before
    base = ["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--device", "cpu",
            "--batch-size", "2", "--work-dir", str(work), "--resume", "auto"]  # fmt: skip
    assert main([*base, "--iters", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("mIoU ") and err.count("\n") == 1 and err.endswith("to train on\n")  # the run's settings
    other = shutil.copytree(generic, tmp_path / "other")  # another data set given: not read, and said so
    assert main([*base[:4], str(other), *base[5:], "--iters", "2"]) == 0
    assert capsys.readouterr().err.endswith("the settings given that differ from the run's (data) are not used\n")
    assert main([*base, "--iters", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"denseclip-fast: error: {work / 'iter_2.state.pt'} is at iteration 2, past this "
                                 "run's iters 1: a run cannot go back; resume with iters 2 or more (--iters), or "
                                 f"evaluate {work / 'iter_2.safetensors'} with eval\n")  # fmt: skip
    assert files() == before
    os.remove(work / "eval_iter_2.json")  # stopped after its final eval.csv row, before the JSON
    train(dataclasses.replace(cfg, lr=5e-4), resume="auto")
    assert "already trained to iteration 2 (" in capsys.readouterr().err
    with open(work / "eval.csv", newline="") as f:
        assert [int(r["iter"]) for r in csv.DictReader(f)] == [2]
    assert os.path.exists(work / "eval_iter_2.json") and files()["config.json"] == before["config.json"]
    # a split without one labelled pixel: its metrics were NaN, written null; returned as evaluate returned them
    saved = json.loads((work / "eval_iter_2.json").read_text())
    (work / "eval_iter_2.json").write_text(json.dumps({**saved, "mIoU": None, "mAcc": None, "aAcc": None}))
    final = train(dataclasses.replace(cfg, lr=5e-4), resume="auto")["eval"]
    assert final is not None and all(math.isnan(final[k]) for k in ("mIoU", "mAcc", "aAcc"))
    assert final["per_class"] == saved["per_class"] and final["images"] == saved["images"]


def test_a_file_where_a_directory_belongs_and_back_is_named_as_such(arch_file, generic, tmp_path, capsys):
    """--data naming a file, a data set whose images/ is a file, and --resume naming a directory each said that the
    path "does not exist"; it does: each now says what it is."""
    from denseclip_fast.train.data import find_samples

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=rf"^data directory {re.escape(repr(str(tmp_path / 'afile')))} is not a "
                                         r"directory$"):  # fmt: skip
        _config(arch_file, str(tmp_path / "afile"), tmp_path / "w").validate()
    with pytest.raises(ValueError, match=r"^data directory .*afile' is not a directory$"):
        find_samples(str(tmp_path / "afile"), "generic", "val")  # eval --data: "afile/images does not exist"
    shutil.copytree(generic, tmp_path / "data")
    shutil.rmtree(tmp_path / "data" / "images")
    (tmp_path / "data" / "images").write_text("")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'data' / 'images'))} is not a directory \(the "
                                         r"layouts: README.md, Training, Data\)$"):  # fmt: skip
        find_samples(str(tmp_path / "data"), "generic", "train")
    run = ["train", "--arch", arch_file, "--data", generic, "--layout", "generic", "--device", "cpu",
           "--work-dir", str(tmp_path / "w")]  # fmt: skip
    assert main([*run, "--resume", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: resume file {str(tmp_path)!r} is a directory: --resume "
                                       "takes a training state file: the iter_N.state.pt that train writes beside "
                                       "each iter_N.safetensors, or 'auto'\n")  # fmt: skip
    assert main([*run, "--resume", str(tmp_path / "gone.state.pt")]) == 2
    assert capsys.readouterr().err == (f"denseclip-fast: error: resume file {str(tmp_path / 'gone.state.pt')!r} does "
                                       "not exist\n")  # fmt: skip
    assert not os.path.exists(tmp_path / "w")


def test_a_fresh_run_checks_the_work_dir_again_once_it_holds_it(arch_file, generic, tmp_path, monkeypatch):
    """The work dir is checked for checkpoints before the run builds its model and data, and taken (locked) after:
    a run that held it meanwhile may have saved some, which the fresh run would then prune and mix with its own."""
    work = tmp_path / "w"
    real_build = build_model

    def build_while_another_run_saves(cfg, class_names, say=None, init=True):
        os.makedirs(work, exist_ok=True)
        (work / "iter_5.safetensors").write_bytes(b"")
        return real_build(cfg, class_names, say, init)

    monkeypatch.setattr("denseclip_fast.train.loop.build_model", build_while_another_run_saves)
    with pytest.raises(ValueError, match=r"holds checkpoint files that cannot be resumed \(iter_5.safetensors"):
        train(_config(arch_file, generic, work))
    assert sorted(os.listdir(work)) == [".lock", "iter_5.safetensors"]


# ------------------------------------------------------------------------------------------------ --init DenseCLIP


def test_a_run_starts_from_a_denseclip_checkpoint(arch_file, generic, tmp_path):
    """--init with a DenseCLIP checkpoint of the run's architecture: every weight is the file's when its classes are
    the run's; with other classes (another count, or other names) the classifier and the score map's columns of the
    neck's lateral convolution keep the run's own initialisation (the same seed's: as with --init none), the
    class tokens are the run's names, everything else is the file's, and a note says so."""
    from denseclip_fast import DenseCLIP

    cfg = _config(arch_file, generic, tmp_path / "x")
    torch.manual_seed(123)  # weights unlike a fresh run's
    source = DenseCLIP(cfg.model_config(), CLASSES)
    with torch.no_grad():
        source.gamma.fill_(0.5)
    path = tmp_path / "source.safetensors"
    source.save(path)
    given = source.state_dict()
    started = dataclasses.replace(cfg, init=str(path))
    notes: list[str] = []
    same = build_model(started, CLASSES, notes.append).state_dict()
    assert not notes and all(torch.equal(same[k], v) for k, v in given.items())
    index = cfg.model_config().score_concat_index
    lateral = f"neck.lateral_convs.{index}.conv.weight"
    for names in (["cat", "dog"], ["sky", "road", "grass"]):  # another count; the same count, another order
        fresh = build_model(cfg, names).state_dict()
        moved = build_model(started, names, notes.append).state_dict()
        channels = fresh[lateral].shape[1] - len(names)
        for key, value in moved.items():
            if key.startswith("decode_head.conv_seg.") or key == "class_tokens":
                assert torch.equal(value, fresh[key]), key
            elif key == lateral:
                assert torch.equal(value[:, :channels], given[key][:, :channels])
                assert torch.equal(value[:, channels:], fresh[key][:, channels:])
            else:
                assert torch.equal(value, given[key]), key
        assert notes[-1] == (f"--init {path}: the trained head's classifier and the score map's columns of {lateral} "
                             f"keep their initialisation (its 3 classes are not the run's {len(names)}, name for "
                             "name); every other weight is the checkpoint's")  # fmt: skip


def test_a_denseclip_checkpoint_of_another_architecture_or_grid(arch_file, generic, tmp_path):
    """Another architecture is refused, naming the fields that differ; another input resolution has its positional
    embedding resized to the run's grid (said in a note); --init's check names both kinds of file."""
    from denseclip_fast import DenseCLIP
    from denseclip_fast.model.resnet import resize_positional_grid

    cfg = _config(arch_file, generic, tmp_path / "x")
    vit = tmp_path / "vit.safetensors"
    DenseCLIP(tiny_config("vit"), CLASSES).save(vit)
    with pytest.raises(CheckpointError, match=r"vit.safetensors: this DenseCLIP checkpoint \(--init\) is of "
                                              r"another architecture than the run's \(--arch\): .*vision\.kind: 'vit' "
                                              r"in the file, 'resnet' here"):  # fmt: skip
        build_model(dataclasses.replace(cfg, init=str(vit)), CLASSES)
    own = cfg.model_config()
    vision = dataclasses.replace(own.vision, input_resolution=2 * own.vision.input_resolution)
    larger = dataclasses.replace(own, vision=vision)
    source = DenseCLIP(larger, CLASSES)
    path = tmp_path / "larger.safetensors"
    source.save(path)
    notes: list[str] = []
    model = build_model(dataclasses.replace(cfg, init=str(path)), CLASSES, notes.append)
    key = "backbone.attnpool.positional_embedding"
    old, new = larger.vision.grid, own.vision.grid
    assert torch.equal(model.state_dict()[key], resize_positional_grid(source.state_dict()[key], old, (new, new)))
    assert notes == [f"--init {path}: {key} resized from a {old}x{old} grid to {new}x{new}"]
    with pytest.raises(ValueError, match=r"init \(--init\) must be CLIP weights, a DenseCLIP checkpoint or 'none'"):
        dataclasses.replace(cfg, init=str(tmp_path / "missing.pt")).validate()


def test_train_from_a_denseclip_checkpoint_says_what_it_kept(arch_file, generic, tmp_path, capsys):
    """The command line's run from a DenseCLIP checkpoint of other classes trains, and says on stderr which weights
    kept their initialisation; resuming that run says nothing of it again, nor reads the file: its checkpoint holds
    every weight, and the file may be gone (a fresh run, also --resume auto without a checkpoint, needs it)."""
    from denseclip_fast import DenseCLIP

    cfg = _config(arch_file, generic, tmp_path / "run", iters=2, checkpoint_interval=1)
    path = tmp_path / "ade.safetensors"
    DenseCLIP(cfg.model_config(), ["wall", "floor"]).save(path)
    train(dataclasses.replace(cfg, init=str(path), iters=1))
    err = capsys.readouterr().err
    assert f"denseclip-fast train: --init {path}: the trained head's classifier" in err
    os.remove(path)
    train(dataclasses.replace(cfg, init=str(path)), resume="auto")
    assert "--init" not in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"init \(--init\) must be CLIP weights, a DenseCLIP checkpoint or 'none'; "
                                         r".*ade.safetensors' does not exist"):  # fmt: skip
        train(dataclasses.replace(cfg, init=str(path), work_dir=str(tmp_path / "fresh")), resume="auto")
    assert not os.path.exists(tmp_path / "fresh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_denseclip_checkpoint_starts_a_float32_run(arch_file, generic, tmp_path, dtype):
    """A DenseCLIP checkpoint of a model in bfloat16 or float16 (``.to(dtype)``, then saved), here of another input
    resolution, starts a float32 run: every weight is the file's value in float32, the positional grid resized from
    those values."""
    from denseclip_fast import DenseCLIP
    from denseclip_fast.model.resnet import resize_positional_grid

    cfg = _config(arch_file, generic, tmp_path / "x")
    own = cfg.model_config()
    vision = dataclasses.replace(own.vision, input_resolution=2 * own.vision.input_resolution)
    larger = dataclasses.replace(own, vision=vision)
    torch.manual_seed(123)
    source = DenseCLIP(larger, CLASSES).to(dtype)
    path = tmp_path / "half.safetensors"
    source.save(path)
    model = build_model(dataclasses.replace(cfg, init=str(path)), CLASSES)
    state, key = model.state_dict(), "backbone.attnpool.positional_embedding"
    old, new = larger.vision.grid, own.vision.grid
    for name, value in source.state_dict().items():
        floating = value.is_floating_point()
        assert state[name].dtype == (torch.float32 if floating else value.dtype), name
        expected = value.to(state[name].dtype)
        if name == key:
            expected = resize_positional_grid(expected, old, (new, new))
        assert torch.equal(state[name], expected), name


def test_a_vit_denseclip_checkpoint_of_another_grid_computes_as_the_file_did(tmp_path):
    """ViT-B/16's positional embedding from a checkpoint of another input resolution: the class token's row kept,
    the grid resized as the model resizes it for an input of another size, so that the new model's output on an
    image of its own resolution is the file's model's on that image."""
    from denseclip_fast import DenseCLIP

    own = tiny_config("vit", input_resolution=96)
    source_config = tiny_config("vit", input_resolution=64)
    arch = tmp_path / "vit.json"
    arch.write_text(json.dumps(own.to_dict()))
    torch.manual_seed(123)
    source = DenseCLIP(source_config, CLASSES).eval()
    path = tmp_path / "vit.safetensors"
    source.save(path)
    notes: list[str] = []
    cfg = TrainConfig(arch=str(arch), init=str(path), seed=0)
    model = build_model(cfg, CLASSES, notes.append).eval()
    key = "backbone.positional_embedding"
    assert notes == [f"--init {path}: {key} resized from a 4x4 grid to 6x6"]
    theirs, ours = source.state_dict()[key], model.state_dict()[key]
    assert ours.shape == (37, 64) and torch.equal(ours[0], theirs[0])
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), rtol=0, atol=0)


@pytest.mark.parametrize(
    "field, change, shown",
    [
        ("vision", {"out_indices": (2, 5, 7, 11)}, "vision.out_indices: (3, 5, 7, 11) in the file, (2, 5, 7, 11) here"),
        ("vision", {"heads": 2}, "vision.heads: 1 in the file, 2 here"),
        ("vision", {"double_class_embedding": False}, "vision.double_class_embedding: True in the file, False here"),
        ("decoder", {"heads": 2}, "decoder.heads: 4 in the file, 2 here"),
        ("text", {"heads": 2}, "text.heads: 1 in the file, 2 here"),
        (None, {"activation": "gelu"}, "activation: 'quick_gelu' in the file, 'gelu' here"),
    ],
)  # fmt: skip
def test_a_denseclip_checkpoint_of_other_heads_taps_or_activation_is_refused(tmp_path, field, change, shown):
    """Fields that no tensor's shape shows but that decide what the weights compute (the ViT blocks the pyramid
    taps, the head counts that split each attention's width, the class embedding's second use, the MLPs'
    activation): a file that differs in one is of another architecture, refused naming it; loaded anyway, every
    weight would fit and the model compute something else."""
    from denseclip_fast import DenseCLIP
    from denseclip_fast.checkpoints.transfer import init_from_denseclip

    config = tiny_config("vit")
    path = tmp_path / "vit.safetensors"
    DenseCLIP(config, CLASSES).save(path)
    other = (config.replace(**{field: dataclasses.replace(getattr(config, field), **change)}) if field else
             config.replace(**change))  # fmt: skip
    assert init_from_denseclip(DenseCLIP(config, CLASSES), path) == []  # the same architecture: taken whole
    with pytest.raises(CheckpointError, match=r"is of another architecture than the run's \(--arch\): "
                                              + re.escape(shown) + "$"):  # fmt: skip
        init_from_denseclip(DenseCLIP(other, CLASSES), path)


def test_an_official_layout_denseclip_checkpoint_starts_a_run(arch_file, generic, tmp_path):
    """--init takes a file of the official code's layout too (mmcv's {'meta': {'CLASSES': ...}, 'state_dict': ...},
    here in float16): of the run's classes, every weight is the file's; a bare state dict (names no classes) keeps
    the run's classifier."""
    from benchmarks.official import OfficialDenseCLIP, save_mmcv_checkpoint

    from .conftest import official_cfg, randomized

    cfg = _config(arch_file, generic, tmp_path / "x")
    official = randomized(OfficialDenseCLIP(official_cfg(tiny_config("resnet")), CLASSES)).eval().half()
    path = tmp_path / "official.pth"
    save_mmcv_checkpoint(official, str(path), CLASSES)
    given = official.state_dict()
    notes: list[str] = []
    model = build_model(dataclasses.replace(cfg, init=str(path)), CLASSES, notes.append)
    assert not notes
    for key, value in model.state_dict().items():
        if key != "class_tokens":
            assert value.dtype != torch.float16 and torch.equal(value, given[key].to(value.dtype)), key
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in given.items()}, bare)
    model = build_model(dataclasses.replace(cfg, init=str(bare)), CLASSES, notes.append).state_dict()
    fresh = build_model(cfg, CLASSES).state_dict()
    assert torch.equal(model["decode_head.conv_seg.weight"], fresh["decode_head.conv_seg.weight"])
    assert torch.equal(model["gamma"], given["gamma"].float())
    assert notes == [f"--init {bare}: the trained head's classifier and the score map's columns of "
                     "neck.lateral_convs.3.conv.weight keep their initialisation (the file names no classes); every "
                     "other weight is the checkpoint's"]  # fmt: skip


def test_a_denseclip_checkpoint_of_the_run_s_architecture_under_another_name(arch_file, generic, tmp_path):
    """The architecture's name (``arch``, a preset's or an architecture file's free label) decides no weight: a
    checkpoint of the run's structure saved under another name (a released 'RN50' for a run whose architecture
    file, RN50's with another test scale, says 'custom') starts the run, every weight the file's."""
    from denseclip_fast import DenseCLIP

    cfg = _config(arch_file, generic, tmp_path / "x")
    torch.manual_seed(123)
    source = DenseCLIP(cfg.model_config().replace(arch="my-rn50"), CLASSES)
    path = tmp_path / "named.safetensors"
    source.save(path)
    notes: list[str] = []
    state = build_model(dataclasses.replace(cfg, init=str(path)), CLASSES, notes.append).state_dict()
    assert not notes and all(torch.equal(state[k], v) for k, v in source.state_dict().items())


def test_init_refusals_name_the_option_and_what_it_takes(arch_file, generic, tmp_path):
    """--init of a file that is neither CLIP weights nor a DenseCLIP checkpoint says that --init takes either (it
    said 'not CLIP weights' only); one of another architecture names --init as well as --arch."""
    from denseclip_fast import DenseCLIP

    cfg = _config(arch_file, generic, tmp_path / "x")
    junk = tmp_path / "junk.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, junk)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(junk))}: --init takes CLIP weights or a DenseCLIP "
                                              r"checkpoint; not CLIP weights: no 'visual.conv1.weight' or "
                                              r"'token_embedding.weight'"):  # fmt: skip
        build_model(dataclasses.replace(cfg, init=str(junk)), CLASSES)
    vit = tmp_path / "vit.safetensors"
    DenseCLIP(tiny_config("vit"), CLASSES).save(vit)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(vit))}: this DenseCLIP checkpoint \(--init\) is of "
                                              r"another architecture than the run's \(--arch\): "):  # fmt: skip
        build_model(dataclasses.replace(cfg, init=str(vit)), CLASSES)


@pytest.mark.parametrize("kind", ["denseclip", "bare state dict", "clip"])
def test_init_reads_its_file_once(arch_file, generic, tmp_path, monkeypatch, kind):
    """--init reads its file once, whatever it is: it was read as CLIP weights first, then again as a DenseCLIP
    checkpoint, and a bare state dict (no class names) a third time for its placeholder names. The model is the
    file's all the same (the other tests of --init)."""
    import denseclip_fast.checkpoints as package
    from benchmarks.official import OfficialDenseCLIP
    from denseclip_fast import DenseCLIP
    from denseclip_fast.checkpoints import clip, io, transfer

    from .conftest import official_cfg, randomized

    cfg = _config(arch_file, generic, tmp_path / "x")
    path = tmp_path / ("source.safetensors" if kind == "denseclip" else "source.pth")
    if kind == "denseclip":
        DenseCLIP(cfg.model_config(), CLASSES).save(path)
    elif kind == "bare state dict":
        torch.save(randomized(OfficialDenseCLIP(official_cfg(tiny_config("resnet")), CLASSES)).state_dict(), path)
    else:
        model = DenseCLIP(cfg.model_config(), CLASSES)
        torch.save({**{f"visual.{k}": v for k, v in model.backbone.state_dict().items()},
                    **model.text_encoder.state_dict()}, path)  # fmt: skip
    reads: list[str] = []
    read = io.read_weight_file

    def counted(file: str) -> object:
        reads.append(str(file))
        return read(file)

    for module in (io, clip, transfer, package):
        monkeypatch.setattr(module, "read_weight_file", counted)
    notes: list[str] = []
    build_model(dataclasses.replace(cfg, init=str(path)), CLASSES, notes.append)
    assert reads == [str(path)]
    assert bool(notes) == (kind == "bare state dict")  # the placeholder names' run: its classifier kept


@pytest.mark.parametrize("kept, saved", [(2, [3, 4]), (0, [1, 2, 3, 4])])
def test_max_checkpoints_keeps_the_newest_or_with_0_all(arch_file, generic, tmp_path, kept, saved):
    """The newest max_checkpoints weights and states are kept; 0 keeps every one (as mmcv kept them)."""
    work = tmp_path / "w"
    train(_config(arch_file, generic, work, checkpoint_interval=1, max_checkpoints=kept, iters=4))
    names = os.listdir(work)
    assert sorted(int(n[5:-12]) for n in names if n.startswith("iter_") and n.endswith(".safetensors")) == saved
    assert sorted(int(n[5:-9]) for n in names if n.startswith("iter_") and n.endswith(".state.pt")) == saved


def test_pruning_leaves_the_users_own_iter_files_alone(arch_file, generic, tmp_path):
    """A copy the user keeps in the work dir under another name (iter_2_best.safetensors) is neither pruned nor
    read as an iteration: int() of "2_best" ended the resumed run at its first save with "invalid literal for
    int()"."""
    work = tmp_path / "w"
    train(_config(arch_file, generic, work, checkpoint_interval=1, max_checkpoints=2, iters=2))
    shutil.copy(work / "iter_2.safetensors", work / "iter_2_best.safetensors")
    train(_config(arch_file, generic, work, checkpoint_interval=1, max_checkpoints=2, iters=4), resume="auto")
    names = sorted(n for n in os.listdir(work) if n.startswith("iter_") and n.endswith(".safetensors"))
    assert names == ["iter_2_best.safetensors", "iter_3.safetensors", "iter_4.safetensors"]


def test_the_work_dir_lock_file_holds_this_runs_pid_only_while_it_runs(tmp_path):
    """The lock file holds the PID alone while the run holds it (a longer stale content is cut, not overwritten in
    part), and nothing once it ends; a holder that has not written its PID yet is not named by one. Mutants: the
    ftruncate before the PID or at the end left out, ' (PID ...)' added whatever the file holds."""
    import fcntl

    lock = tmp_path / ".lock"
    lock.write_text("12345678901234567890\n")  # what a crashed writer might leave
    with work_dir_lock(str(tmp_path)) as worker_init:
        assert worker_init is not None and lock.read_text() == f"{os.getpid()}\n"
    assert lock.read_text() == ""  # no PID of a run that has ended
    with open(lock, "r+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)  # held, its PID not written yet
        with pytest.raises(ValueError, match=rf"^work dir {re.escape(repr(str(tmp_path)))} is in use by another run: "
                                             r"wait for it to end"):  # fmt: skip
            with work_dir_lock(str(tmp_path)):
                pass


def test_a_workers_close_copy_closes_only_the_lock_file(tmp_path):
    """worker_init_fn closes its descriptor only where that number is the lock file (a worker started by spawn or
    forkserver inherits none: the number may be another file's). Mutant: the identity check left out."""
    lock = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    try:
        _close_copy(other, os.fstat(lock), 0)
        os.fstat(other)  # still open
        _close_copy(lock, os.fstat(lock), 0)
        with pytest.raises(OSError):
            os.fstat(lock)
    finally:
        os.close(other)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked DataLoader workers")
def test_the_work_dir_lock_is_released_at_the_end_while_a_forked_child_lives_on(tmp_path):
    """A DataLoader worker forked during the run shares the lock's open file: the run unlocks it explicitly as it
    ends, so the work dir is free at once though a worker that never ran worker_init_fn still lives. Mutant: the
    LOCK_UN left out (os.close alone leaves the child's copy holding the lock)."""
    program = f"""
import fcntl, os, time
from denseclip_fast.train.workdir import work_dir_lock
with work_dir_lock({str(tmp_path)!r}):
    child = os.fork()
    if child == 0:
        time.sleep(5)
        os._exit(0)
with open(os.path.join({str(tmp_path)!r}, ".lock")) as f:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except BlockingIOError:
        print("held")
os.kill(child, 9)
os.waitpid(child, 0)
"""
    run = subprocess.run([sys.executable, "-c", program], env=with_root_on_path(), capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.stdout.split() == ["free"], run.stderr


def test_renamed_classes_are_listed_five_at_most(capsys):
    """A resume with renamed classes lists the first five renames and the count. Mutant: the count left out."""
    saved = [f"class {i}" for i in range(7)]
    check_class_names("iter_2.state.pt", saved, [f"thing {i}" for i in range(7)], "data", 0)
    err = capsys.readouterr().err
    assert "4: 'class 4' -> 'thing 4', ... (7 in all)" in err and "'class 5'" not in err
    check_class_names("iter_2.state.pt", saved, [f"thing {i}" for i in range(7)], "data", 1)  # other ranks: quiet
    check_class_names("iter_2.state.pt", saved, list(saved), "data", 0)  # the same names: quiet
    assert capsys.readouterr().err == ""


def test_architecture_difference_lists_at_most_limit_fields():
    """The fields in which two architectures differ, ', ...' only past ``limit``. Mutant: ``>=`` for ``>``."""
    from denseclip_fast.config import preset

    a = preset("RN50")
    b = a.replace(fpn_channels=a.fpn_channels * 2, head_channels=a.head_channels * 2, embed_dim=a.embed_dim * 2)
    theirs, ours = architecture_difference(a, b)
    assert "..." not in theirs and "..." not in ours and theirs.count(",") == 2, (theirs, ours)
    theirs, ours = architecture_difference(a, b, limit=2)
    assert theirs.endswith(", ...") and ours.endswith(", ...")


def test_iteration_of_names_that_are_not_iterations():
    """iteration_of: N of iter_N.*, -1 for a name whose N is not a number (sorted before iter_0). Mutant: 0."""
    assert [iteration_of(n) for n in ("iter_12.state.pt", "iter_0.safetensors", "iter_x.state.pt", "iter_.pt")] == [
        12, 0, -1, -1]


def test_a_saved_optimizer_group_lacking_one_of_this_runs_parameters_names_it():
    """Saved names that this run's group all holds, but not all of this run's: the one only this run has is named
    (not 'in another order'). Mutant: only the saved names looked for in this run's."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([{"params": [a, b], "names": ["a", "b"]}])
    with pytest.raises(ValueError, match=re.escape("parameter group 0 was saved with 1 parameters, this run's has 2 "
                                                   "(e.g. b is in only one of them)")):  # fmt: skip
        load_optimizer_state(optimizer, {"state": {}, "param_groups": [{"params": [0], "names": ["a"]}]})


def test_training_states_with_bool_or_deeply_nested_entries_are_named(tmp_path):
    """An ``iteration`` of True is no int (bool is an int's subclass), and a config nested past the recursion
    limit is no JSON object: each a CheckpointError naming the entry, not a resume at iteration 1 or a
    RecursionError. Mutants: the bool check, the RecursionError caught, left out."""
    from denseclip_fast.train.state import read_train_state

    good = {"iteration": 2, "optimizer": {}, "scaler": {}, "rng": [{"cpu": torch.zeros(2)}], "config": "{}"}
    for name, changed, match in (("bool", {"iteration": True}, r"malformed entries iteration \(int\)"),
                                 ("deep", {"config": "[" * 100_000 + "]" * 100_000},
                                  r"malformed entries config \(a JSON object\)")):  # fmt: skip
        path = tmp_path / f"{name}.state.pt"
        torch.save({**good, **changed}, path)
        with pytest.raises(CheckpointError, match=match):
            read_train_state(str(path))
    torch.save(good, tmp_path / "good.state.pt")
    assert read_train_state(str(tmp_path / "good.state.pt"))["iteration"] == 2


def test_a_resume_names_a_torchscript_archive_and_reads_no_contents_from_foreign_safetensors(tmp_path):
    """--resume of a TorchScript archive says so (not 'a .safetensors model file'); the saved architecture and
    class names are read only from this project's safetensors, None from another's (loading it says why). Mutants:
    the message for every non-torch kind the safetensors one; ``is_native`` not asked."""
    from safetensors.torch import save_file

    from denseclip_fast.train.state import read_train_state, saved_contents

    scripted = tmp_path / "s.state.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated (as test_checkpoints makes its archives)
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(CheckpointError, match=r"cannot resume from it: it is a TorchScript archive; --resume takes"):
        read_train_state(str(scripted))
    foreign = tmp_path / "f.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    assert saved_contents(str(foreign)) is None
    assert saved_contents(str(tmp_path / "missing.safetensors")) is None


def test_the_cuda_optimizer_is_the_fused_adamw():
    """O01: on CUDA make_optimizer takes AdamW's fused implementation (the CPU test checks foreach only; fused AdamW
    also takes CPU parameters, so no GPU is needed to see the choice)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    group = make_optimizer(model, TrainConfig(), torch.device("cuda")).param_groups[0]
    assert group["fused"] is True and not group["foreach"]
    group = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups[0]
    assert not group["fused"] and group["foreach"] is True


def test_official_norm_decay_lets_the_backbone_key_win_over_norm():
    """O06: mmcv tried its custom keys longest first, so "backbone" (lr x 0.1, decayed) beat "norm" (no decay) for
    a backbone parameter named *norm*; the default exempts it as a normalisation layer. (The project's ResNet and
    ViT backbones have no parameter named *norm*, so the model-based tests cannot see the difference.)"""
    model = torch.nn.ModuleDict({"backbone": torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(4)}),
                                 "head": torch.nn.ModuleDict({"norm1": torch.nn.LayerNorm(4),
                                                              "proj": torch.nn.Linear(4, 4)})})  # fmt: skip
    cfg = TrainConfig(lr=1e-4, weight_decay=1e-4, backbone_lr_mult=0.1, norm_decay="official")
    got = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg) for n in g["names"]}
    assert got["backbone.norm.weight"] == pytest.approx((1e-5, 1e-4))
    assert got["head.norm1.weight"] == pytest.approx((1e-4, 0.0))
    assert got["head.proj.weight"] == pytest.approx((1e-4, 1e-4))
    cfg.norm_decay = "all"
    got = {n: (g["lr"], g["weight_decay"]) for g in param_groups(model, cfg) for n in g["names"]}
    assert got["backbone.norm.weight"] == pytest.approx((1e-5, 0.0))


def test_the_groups_outside_the_backbone_come_first_whatever_the_modules_order():
    """O12: param_groups orders its groups (head, head norms, backbone, backbone norms), not by the first parameter
    met: set_learning_rates logs the first group's rate as the head's. DenseCLIP registers its own parameters
    (contexts, gamma) before the backbone, which hid an insertion-ordered list; a model whose backbone comes first
    logged the backbone's rate."""
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 4)})
    cfg = TrainConfig(lr=1e-4, backbone_lr_mult=0.1, iters=100, warmup_iters=0, min_lr=0.0)
    groups = param_groups(model, cfg)
    assert [g["names"] for g in groups] == [["head.weight", "head.bias"], ["backbone.weight", "backbone.bias"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    assert set_learning_rates(optimizer, 0, cfg) == pytest.approx(1e-4)


def test_a_local_world_size_of_0_is_read_as_one_process(monkeypatch):
    """LOCAL_WORLD_SIZE=0 is no process count: the CPUs are this process's alone (not a ZeroDivisionError)."""
    from denseclip_fast.train import config as config_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")
    assert config_module.default_num_workers() == 2


def test_a_ratio_range_given_as_a_list_is_the_pair_it_stands_for(arch_file, generic, tmp_path):
    """As img_scale: a list (a Python sweep's, YAML's) is the tuple, and validate takes it."""
    cfg = _config(arch_file, generic, tmp_path / "w", ratio_range=[0.75, 1.5])
    assert cfg.ratio_range == (0.75, 1.5) and isinstance(cfg.ratio_range, tuple)
    cfg.validate()


def test_validate_without_init_file_leaves_a_missing_init_unchecked(arch_file, generic, tmp_path):
    """A resumed run takes its weights from the checkpoint: the init file it started from may have moved since."""
    cfg = _config(arch_file, generic, tmp_path / "w", init=str(tmp_path / "moved.pt"))
    cfg.validate(init_file=False)
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / 'moved.pt')!r} does not exist")):
        cfg.validate()


@pytest.mark.parametrize(
    "overrides",
    [{"seed": 2**32 - 1}, {"lr": 1.0, "weight_decay": 1.0, "backbone_lr_mult": 1.0}, {"min_lr": 1.0},
     {"warmup_ratio": 1.0}, {"cat_max_ratio": 1.0}, {"ratio_range": (1.0, 1.0)}],
)  # fmt: skip
def test_the_ends_of_each_range_are_accepted(arch_file, generic, tmp_path, overrides):
    """The bounds the messages give are inclusive: seed 0..4294967295, lr <= 1 (and lr x mult <= 1), min_lr and
    warmup_ratio <= 1, cat_max_ratio 1 (no check), ratio_range low <= high (one scale)."""
    _config(arch_file, generic, tmp_path / "w", **overrides).validate()


def test_a_ratio_range_that_shrinks_the_short_side_below_a_pixel_is_refused(arch_file, generic, tmp_path):
    """The short side is the one that vanishes: 200 x 0.004 = 0.8 pixels, though the long side keeps 4."""
    cfg = _config(arch_file, generic, tmp_path / "w", img_scale=(1024, 200), ratio_range=(0.004, 1.0))
    with pytest.raises(ValueError, match=re.escape("ratio_range's low end 0.004 scales img_scale (1024, 200) below")):
        cfg.validate()


def test_a_template_config_still_needs_a_work_dir(arch_file):
    """--print-config's template need not have a writable work dir here, but it must name one."""
    with pytest.raises(ValueError, match=re.escape("work_dir must name a directory, got ''")):
        TrainConfig(arch=arch_file, work_dir="").validate(template=True)


@pytest.mark.parametrize(
    "field, value, message",
    [("amp", "fp32", "amp must be 'bf16', 'fp16' or 'none', got 'fp32'"),
     ("eval_mode", "sliding", "eval_mode must be 'whole' or 'slide', got 'sliding'")],
)  # fmt: skip
def test_a_string_field_outside_its_choices_is_refused_naming_them(arch_file, generic, tmp_path, field, value,
                                                                   message):  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(arch_file, generic, tmp_path / "w", **{field: value}).validate()


def test_clip_activation_replaces_the_architectures_activation():
    assert TrainConfig(arch="RN50").model_config().activation == "quick_gelu"  # OpenAI CLIP's, the preset's
    assert TrainConfig(arch="RN50", clip_activation="gelu").model_config().activation == "gelu"


def test_absolute_paths_make_each_path_absolute_and_leave_names_alone(tmp_path, monkeypatch):
    """config.json keeps data, work_dir, init and an architecture file absolute (a resume from elsewhere finds
    them); 'none' and a released architecture's name stay names, even beside a file of that name."""
    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    (tmp_path / "RN50").write_text("")
    (tmp_path / "arch.json").write_text("{}")
    fields = TrainConfig(arch="RN50", data="d", work_dir="w", init="none").to_dict(absolute_paths=True)
    assert (fields["arch"], fields["data"], fields["work_dir"], fields["init"]) == (
        "RN50", os.path.join(here, "d"), os.path.join(here, "w"), "none")  # fmt: skip
    fields = TrainConfig(arch="arch.json", init="w.pt").to_dict(absolute_paths=True)
    assert (fields["arch"], fields["init"], fields["data"]) == (os.path.join(here, "arch.json"),
                                                                os.path.join(here, "w.pt"), "")  # fmt: skip
    assert TrainConfig(data="d").to_dict()["data"] == "d"  # without absolute_paths: as given


def test_one_unknown_key_with_a_close_field_is_told_that_field():
    with pytest.raises(ValueError) as caught:
        TrainConfig.from_dict({"itres": 10})
    assert str(caught.value) == ("unknown training config keys ['itres']: did you mean 'iters'? (train "
                                 "--print-config prints every key)")  # fmt: skip


def test_an_empty_yaml_config_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set yet\n")
    assert TrainConfig.load(str(path)) == TrainConfig()


def test_the_yaml_value_count_counts_keys_and_stops_only_past_the_bound():
    """Values as printing meets them: the container, each key, each value; 'more than' the limit."""
    from denseclip_fast.train.config import _more_values_than

    assert not _more_values_than([1, 2], 3) and _more_values_than([1, 2, 3], 3)
    assert _more_values_than({"a": 1, "b": 2}, 4) and not _more_values_than({"a": 1, "b": 2}, 5)


@pytest.mark.parametrize(
    "key, message",
    [("iters", "iters must be an int, got True"), ("num_workers", "num_workers must be an int or null, got True")],
)  # fmt: skip
def test_a_yaml_bool_for_an_int_field_is_refused_when_the_file_is_read(tmp_path, key, message):
    """true is no count: not 1 for iters, refused when the file is read (not only at validate)."""
    path = tmp_path / "run.yaml"
    path.write_text(f"{key}: true\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig.load(str(path))


def test_a_yaml_bool_for_the_learning_rate_is_refused_not_read_as_1(tmp_path):
    """lr: true is no learning rate: refused naming lr when the file is read, as iters: true is (it was read as
    True, which only validate refused), not taken as lr 1.0 (which validate accepts)."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: true\n")
    with pytest.raises(ValueError, match=re.escape("lr must be a number, got True")):
        TrainConfig.load(str(path))
    for field in ("lr", "min_lr", "cat_max_ratio"):
        with pytest.raises(ValueError, match=rf"^{field} must be a number, got False$"):
            TrainConfig.from_dict({field: False})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0 and TrainConfig.from_dict({"lr": "2e-4"}).lr == 2e-4


def test_the_defaults_the_readme_gives_beside_the_official_recipe():
    """README: the newest 3 checkpoints kept, cuDNN benchmark on (mmseg's runtime), no weight decay on any
    normalisation layer (norm_decay 'all'), bf16 autocast, one evaluation at the end."""
    for cfg in (TrainConfig(), train_preset("RN50")):
        assert (cfg.max_checkpoints, cfg.cudnn_benchmark, cfg.norm_decay, cfg.amp, cfg.eval_interval) == (
            3, True, "all", "bf16", 0)  # fmt: skip




def _recorded_process_group(monkeypatch, initialized: bool = False) -> list[tuple]:
    """torch.distributed's group calls and torch.cuda.set_device recorded instead of made (no GPU, no group)."""
    from denseclip_fast.train import launch

    calls: list[tuple] = []
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(launch.dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(launch.dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(launch.torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    return calls


def _torchrun_env(monkeypatch, rank: str | None, world: str | None, local: str | None) -> None:
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_a_torchrun_process_on_the_cpu_starts_a_gloo_group_and_ends_it_after_a_barrier(monkeypatch):
    """Every rank done with its collectives (the barrier) before the group goes; after a failure no barrier (the
    other ranks may never reach it: a hang), but the group it started still goes; a group the caller started is
    neither started again nor destroyed."""
    from denseclip_fast.train.launch import distributed

    calls = _recorded_process_group(monkeypatch)
    _torchrun_env(monkeypatch, "1", "2", "1")
    with distributed(TrainConfig(device="cpu")) as got:
        assert got == (1, 2, torch.device("cpu")) and calls == [("init", "gloo")]
    assert calls == [("init", "gloo"), ("barrier",), ("destroy",)]
    calls.clear()
    with pytest.raises(RuntimeError, match="a rank failed"), distributed(TrainConfig(device="cpu")):
        raise RuntimeError("a rank failed")
    assert calls == [("init", "gloo"), ("destroy",)]
    calls = _recorded_process_group(monkeypatch, initialized=True)
    with distributed(TrainConfig(device="cpu")) as got:
        assert got == (1, 2, torch.device("cpu"))
    assert calls == []
    _torchrun_env(monkeypatch, None, None, None)  # one process: no group at all
    with distributed(TrainConfig(device="cpu")) as got:
        assert got == (0, 1, torch.device("cpu"))
    assert calls == []


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank_and_one_process_the_gpu_given(monkeypatch):
    """Under torchrun each process drives GPU LOCAL_RANK (whatever index --device gave) in an NCCL group; a run
    in one process takes the GPU given (cuda:2), cuda:0 for 'cuda', and '' is cuda where CUDA is available."""
    from denseclip_fast.train import launch

    calls = _recorded_process_group(monkeypatch)
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    _torchrun_env(monkeypatch, "3", "4", "1")
    with launch.distributed(TrainConfig(device="cuda:3")) as (rank, world, device):
        assert (rank, world, device) == (3, 4, torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl"), ("barrier",), ("destroy",)]
    _torchrun_env(monkeypatch, None, None, None)
    for given, expected in (("cuda:2", torch.device("cuda", 2)), ("cuda", torch.device("cuda", 0)),
                            ("", torch.device("cuda", 0))):  # fmt: skip
        calls.clear()
        with launch.distributed(TrainConfig(device=given)) as (_, _, device):
            assert device == expected, given
        assert calls == [("set_device", expected)], given


def test_cudnn_benchmark_is_set_for_the_run_and_restored_after_it_even_after_a_failure():
    from denseclip_fast.train.launch import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    try:
        for value in (True, False):
            torch.backends.cudnn.benchmark = not value
            with pytest.raises(RuntimeError, match="failed"), cudnn_benchmark(value):
                assert torch.backends.cudnn.benchmark is value
                raise RuntimeError("failed")
            assert torch.backends.cudnn.benchmark is (not value)
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("env", [{"RANK": "\u0661", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "+2"}])
def test_torchrun_variables_in_other_digits_or_with_a_sign_are_refused(env):
    """int() takes Arabic-Indic digits and a '+': no torchrun writes them."""
    from denseclip_fast.train.launch import launch_environment

    with pytest.raises(ValueError, match="must be a non-negative integer"):
        launch_environment(env)


def test_a_local_rank_left_unset_is_0_whatever_the_rank():
    from denseclip_fast.train.launch import launch_environment

    assert launch_environment({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, 0)


def _state_file(path, cfg: TrainConfig, iteration: int = 2, drop=(), **config) -> str:
    """A minimal training state (as read_train_state accepts it) whose config is ``cfg``'s, without the fields
    ``drop`` (as an older version wrote it) and with ``config``'s values."""
    saved = {k: v for k, v in {**cfg.to_dict(), **config}.items() if k not in drop}
    torch.save({"iteration": iteration, "optimizer": {}, "scaler": {}, "rng": [{"cpu": torch.get_rng_state()}],
                "config": json.dumps(saved)}, str(path))  # fmt: skip
    return str(path)


def test_next_batch_gives_a_workers_error_as_its_last_line_alone():
    """A DataLoader worker's ValueError comes back as the worker's last line without its 'ValueError: ' (the CLI
    prints 'denseclip-fast: error: ' before it); any other ValueError goes through as it was raised."""
    from denseclip_fast.train.loop import next_batch

    def failing(exc):
        raise exc
        yield

    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"data.py\", line 9, in read_label\nValueError: a.png: label value 7 is out "
                        "of range for 3 classes\n\n")  # fmt: skip
    with pytest.raises(ValueError) as err:
        next_batch(failing(worker))
    assert str(err.value) == "a.png: label value 7 is out of range for 3 classes"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    own = ValueError("ValueError: not from a worker\nsecond line")
    with pytest.raises(ValueError) as err:
        next_batch(failing(own))
    assert err.value is own
    assert next_batch(iter([1, 2])) == 1


def test_resume_auto_names_a_latest_json_of_another_shape_as_damaged(arch_file, generic, tmp_path):
    """latest.json that is JSON but not an object, whose "state" is not a file name, or that names a directory: one
    ValueError saying what to do, not a TypeError from deep inside; no latest.json (or a folder of that name), or a
    resume of '' or 'none', is a fresh run."""
    work = tmp_path / "w"
    work.mkdir()
    cfg = _config(arch_file, generic, work)
    trainer = Trainer(cfg, resume="auto")
    assert trainer._find_resume() is None
    (work / "latest.json").mkdir()
    assert trainer._find_resume() is None
    (work / "latest.json").rmdir()
    for content in ('["iter_2.state.pt"]', '{"state": 2}', '{"state": null}'):
        (work / "latest.json").write_text(content)
        with pytest.raises(ValueError, match=r"^--resume auto: .*latest.json is damaged \(TypeError: .*resume from an "
                                             r"iter_N.state.pt of the work dir with --resume FILE$"):  # fmt: skip
            trainer._find_resume()
    (work / "iter_2.state.pt").mkdir()  # a folder of a state's name is no state
    (work / "latest.json").write_text('{"state": "iter_2.state.pt"}')
    with pytest.raises(ValueError, match=r"names .*iter_2.state.pt, which does not exist"):
        trainer._find_resume()
    for fresh in (None, "", "none"):
        assert Trainer(cfg, resume=fresh)._find_resume() is None


def test_only_latest_json_and_iter_n_weights_count_as_a_runs_checkpoints(arch_file, generic, tmp_path):
    """A work dir holding the user's own .safetensors (CLIP weights, an exported model) holds no run: a fresh run
    may start there; an iter_N.safetensors or a latest.json alone are a run's."""
    work = tmp_path / "w"
    trainer = Trainer(_config(arch_file, generic, work))
    assert not trainer._holds_checkpoints()  # no work dir yet
    work.mkdir()
    for name in ("clip.safetensors", "model_iter_3.safetensors", "iter_3.txt", "latest.json.bak"):
        (work / name).write_bytes(b"")
    assert not trainer._holds_checkpoints()
    trainer._refuse_used_work_dir()  # nothing to refuse
    (work / "latest.json").write_text("{}")
    assert trainer._holds_checkpoints()
    os.remove(work / "latest.json")
    (work / "iter_3.safetensors").write_bytes(b"")
    assert trainer._holds_checkpoints()


def test_a_state_of_this_work_dir_given_by_a_relative_path_is_not_another_runs(arch_file, generic, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    """--resume w/iter_2.state.pt with --work-dir w (relative, or the same folder by another spelling) resumes this
    run: the folders are compared as files, not as strings; a state of another work dir is refused there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    for name in ("iter_2.safetensors", "iter_2.state.pt", "latest.json"):
        (tmp_path / "w" / name).write_bytes(b"")
    for work_dir in ("w", "./w", str(tmp_path / "w")):
        Trainer(_config(arch_file, generic, work_dir))._refuse_another_runs_state(os.path.join("w", "iter_2.state.pt"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "iter_1.state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--resume other/iter_1.state.pt is a state of another work dir"):
        Trainer(_config(arch_file, generic, "w"))._refuse_another_runs_state(os.path.join("other", "iter_1.state.pt"))


def test_a_used_work_dir_is_listed_and_advised_by_iteration_not_by_name(arch_file, generic, tmp_path):
    """Past iteration 9 the names sort otherwise than the iterations: the listing goes 9, 10, and the state advised
    is the newest by iteration (iter_10), never one whose weights are missing beside it; eight files are listed
    whole, a ninth becomes ', ...'."""
    work = tmp_path / "w"
    work.mkdir()
    cfg = _config(arch_file, generic, work)
    for name in ("iter_9.safetensors", "iter_9.state.pt", "iter_10.safetensors", "iter_10.state.pt"):
        (work / name).write_bytes(b"")
    newest = re.escape(str(work / "iter_10.state.pt"))
    listed = r"iter_9.safetensors, iter_9.state.pt, iter_10.safetensors, iter_10.state.pt"
    for fresh in (None, "", "none"):  # a fresh run's advice, not --resume auto's
        with pytest.raises(ValueError, match=rf"\({listed}\) but no latest.json: continue their run with --resume "
                                             rf"{newest}, or start"):  # fmt: skip
            Trainer(cfg, resume=fresh)._refuse_used_work_dir()
    with pytest.raises(ValueError, match=rf"checkpoint files \({listed}\): name the newest state explicitly with "
                                         rf"--resume {newest}, or start"):  # fmt: skip
        Trainer(cfg, resume="auto")._refuse_used_work_dir()
    (work / "iter_11.state.pt").write_bytes(b"")  # its weights were never written: not resumable
    with pytest.raises(ValueError, match=rf"iter_11.state.pt\) but no latest.json: continue their run with --resume "
                                         rf"{newest}, or start"):  # fmt: skip
        Trainer(cfg)._refuse_used_work_dir()
    for name in ("iter_9.state.pt", "iter_10.state.pt"):
        os.remove(work / name)
    listed = r"\(iter_9.safetensors, iter_10.safetensors, iter_11.state.pt: no iter_N.state.pt beside"
    with pytest.raises(ValueError, match=r"holds checkpoint files that cannot be resumed " + listed):
        Trainer(cfg)._refuse_used_work_dir()
    for name in ("iter_11.state.pt", "iter_9.safetensors", "iter_10.safetensors"):
        os.remove(work / name)
    eight = [f"iter_{i}{suffix}" for i in range(1, 5) for suffix in (".safetensors", ".state.pt")]
    for name in eight:
        (work / name).write_bytes(b"")
    with pytest.raises(ValueError) as err:
        Trainer(cfg)._refuse_used_work_dir()
    assert f"({', '.join(eight)}) but no latest.json" in str(err.value)
    (work / "iter_5.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        Trainer(cfg)._refuse_used_work_dir()
    assert f"({', '.join(eight)}, ...) but no latest.json" in str(err.value)


def test_eval_files_are_the_exact_eval_iter_n_json_names_whose_n_is_taken(arch_file, generic, tmp_path):
    """A resume removes the eval_iter_N.json after its iteration and a fresh run moves them aside: a copy the user
    made (eval_iter_3.json.bak) or another name is none of them."""
    work = tmp_path / "w"
    work.mkdir()
    for name in ("eval_iter_3.json", "eval_iter_10.json", "eval_iter_3.json.bak", "eval_iter_x.json",
                 "my_eval_iter_4.json", "eval_iter_.json"):  # fmt: skip
        (work / name).write_text("{}")
    trainer = Trainer(_config(arch_file, generic, work))
    assert trainer._eval_files(lambda iteration: True) == ["eval_iter_10.json", "eval_iter_3.json"]
    assert trainer._eval_files(lambda iteration: iteration > 3) == ["eval_iter_10.json"]


def test_an_events_file_holds_events_past_its_version_record_or_when_unreadable(tmp_path):
    """_holds_events: an empty file or one of the version record alone (8-byte length, 4-byte CRC, the data, 4-byte
    CRC) holds none (a run that failed before its first step: removed, not moved aside); a longer one, a malformed
    one or one that cannot be read is kept."""
    from denseclip_fast.train.loop import _holds_events

    path = tmp_path / "events.out.tfevents.1.host"
    version = b"brain.Event:2"
    record = len(version).to_bytes(8, "little") + b"crc!" + version + b"crc!"
    for content, holds in ((b"", False), (record, False), (record + record, True), (record[:-1], True),
                           (b"abc", True)):  # fmt: skip
        path.write_bytes(content)
        assert _holds_events(str(path)) is holds, content
    assert _holds_events(str(tmp_path / "gone")) is True
    assert _holds_events(str(tmp_path)) is True  # a folder: not readable as a file


def test_resume_sizes_and_settings_of_a_state_written_before_some_fields_existed(arch_file, generic, tmp_path):
    """A state whose config lacks fields (crop, img_scale, norm_decay, min_lr: an older version's) resumes: the sizes
    stay the architecture's, no field is said to have changed but the ones that did, and without weights beside it
    (so no saved architecture to compare) the settings are not refused."""
    cfg = _config(arch_file, generic, tmp_path / "w", crop=None, img_scale=None)
    state = _state_file(tmp_path / "iter_2.state.pt", Trainer(cfg).cfg, drop=("crop", "img_scale", "norm_decay",
                                                                                "min_lr"), lr=5e-4)  # fmt: skip
    trainer = Trainer(cfg, resume=state)
    filled = (trainer.cfg.crop, trainer.cfg.img_scale)
    trainer._keep_saved_sizes(state)
    assert (trainer.cfg.crop, trainer.cfg.img_scale) == filled == (64, (128, 64))
    trainer._check_settings(state)
    assert list(trainer._changed) == ["lr"] and "the saved run had 0.0005" in trainer._changed["lr"]
    kept = Trainer(cfg, resume=state)
    _state_file(tmp_path / "iter_2.state.pt", kept.cfg, crop=48, img_scale=[96, 48])
    kept._keep_saved_sizes(state)
    assert (kept.cfg.crop, kept.cfg.img_scale) == (48, (96, 48))


def test_a_complete_run_speaks_and_returns_its_evaluation_on_rank_0_only(arch_file, generic, tmp_path, capsys):
    """Resuming a complete run under torchrun: rank 0 says it is complete and returns the evaluation; the other
    ranks say nothing and return None as their eval (as train's TrainResult says)."""
    work = tmp_path / "w"
    work.mkdir()
    cfg = _config(arch_file, generic, work, iters=4)
    state = _state_file(work / "iter_4.state.pt", cfg, iteration=4)
    (work / "eval_iter_4.json").write_text('{"mIoU": 0.5, "aAcc": 0.75, "mAcc": 0.625}')
    trainer = Trainer(cfg, resume=state)
    trainer._keep_saved_sizes(state)
    capsys.readouterr()
    other = trainer._already_finished(state, 1)
    assert capsys.readouterr().err == "" and other == {"iterations": 4, "last": {}, "eval": None}
    mine = trainer._already_finished(state, 0)
    assert "is already complete at iteration 4" in capsys.readouterr().err
    assert mine is not None and mine["eval"] is not None and mine["eval"]["mIoU"] == 0.5


def test_the_settings_unlike_a_complete_run_ignore_its_work_dir_and_a_config_json_they_cannot_read(
    arch_file, generic, tmp_path
):  # fmt: skip
    """A work dir moved or copied elsewhere (its config.json names the old place), a config.json of an older version
    that lacks fields, or one that is damaged or not an object: no field is said to differ but those that do."""
    work = tmp_path / "w"
    work.mkdir()
    cfg = _config(arch_file, generic, work)
    trainer = Trainer(cfg)
    run = json.loads(json.dumps(trainer.cfg.to_dict(absolute_paths=True)))
    (work / "config.json").write_text(json.dumps({**run, "work_dir": "/elsewhere/w", "iters": 8}))
    assert trainer._settings_unlike_the_run() == []
    (work / "config.json").write_text(json.dumps({k: v for k, v in run.items() if k not in ("lr", "norm_decay")}))
    assert trainer._settings_unlike_the_run() == []
    (work / "config.json").write_text(json.dumps({**run, "lr": 1.0, "seed": 7}))
    assert trainer._settings_unlike_the_run() == ["lr", "seed"]
    for content in ("[1, 2]", '{"lr": ', "null"):
        (work / "config.json").write_text(content)
        assert trainer._settings_unlike_the_run() == [], content


def test_the_micro_batch_divides_the_batch_by_processes_and_accum(arch_file, generic, tmp_path):
    """batch_size / (world x accum) images per process and micro-batch; a batch that the processes x accum do not
    divide is refused naming both; sync_bn is refused on the CPU only where there are processes to synchronise."""
    cpu = torch.device("cpu")
    trainer = Trainer(_config(arch_file, generic, tmp_path / "w", batch_size=8, accum=2))
    assert [trainer._micro_batch(world, cpu) for world in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match=re.escape("batch_size (--batch-size) 8 must be divisible by processes x "
                                                   "accum (--accum) = 8 x 2")):  # fmt: skip
        trainer._micro_batch(8, cpu)
    sync = Trainer(_config(arch_file, generic, tmp_path / "w", batch_size=8, accum=2, sync_bn=True))
    assert sync._micro_batch(1, cpu) == 4
    with pytest.raises(ValueError, match=r"^sync_bn \(--sync-bn\) synchronises BatchNorm across CUDA processes"):
        sync._micro_batch(2, cpu)


def test_claiming_the_work_dir_removes_only_hidden_partial_files_and_keeps_a_resumed_runs_logs(arch_file, generic,
                                                                                              tmp_path):  # fmt: skip
    """A save killed midway leaves .iter_N.*.partial (hidden): removed; a file of the user's that merely ends in
    .partial stays. A resumed run keeps its logs (trimmed later, not moved aside) and writes its config.json; a
    complete one leaves config.json as the run wrote it."""
    work = tmp_path / "w"
    work.mkdir()
    for name in (".iter_4.state.pt.9.0123abcd.partial", "download.partial", "metrics.csv"):
        (work / name).write_text("iter,loss\n1,2.0\n")
    (work / "config.json").write_text("{}")
    cfg = _config(arch_file, generic, work)
    state = str(work / "iter_2.state.pt")
    with contextlib.ExitStack() as held:
        Trainer(cfg, resume=state)._claim_work_dir(state, True, held)
    assert sorted(os.listdir(work)) == [".lock", "config.json", "download.partial", "metrics.csv"]
    assert (work / "config.json").read_text() == "{}"
    with contextlib.ExitStack() as held:
        Trainer(cfg, resume=state)._claim_work_dir(state, False, held)
    assert json.loads((work / "config.json").read_text())["work_dir"] == str(work)
    assert (work / "metrics.csv").read_text() == "iter,loss\n1,2.0\n" and not (work / "previous_logs_1").exists()


def test_logs_moved_aside_skip_every_previous_logs_folder_taken(arch_file, generic, tmp_path, capsys):
    """With previous_logs_1/ and previous_logs_2/ there, the logs go to previous_logs_3/: the next free folder, not
    merely the one after the first (into previous_logs_2/, over its metrics.csv)."""
    work = tmp_path / "w"
    for number in (1, 2):
        (work / f"previous_logs_{number}").mkdir(parents=True)
        (work / f"previous_logs_{number}" / "metrics.csv").write_text(f"iter,loss\n1,{number}.0\n")
    (work / "metrics.csv").write_text("iter,loss\n1,3.0\n")
    Trainer(_config(arch_file, generic, work))._start_logs_over()
    assert [(work / f"previous_logs_{n}" / "metrics.csv").read_text() for n in (1, 2, 3)] == [
        f"iter,loss\n1,{n}.0\n" for n in (1, 2, 3)]  # fmt: skip
    assert capsys.readouterr().err.endswith("moved metrics.csv to previous_logs_3/; this run starts the logs over\n")


def test_pruning_counts_only_exact_iter_n_weights_names(arch_file, generic, tmp_path):
    """A backup the user keeps as iter_3.safetensors.bak is no checkpoint: it is neither pruned nor counted, so
    max_checkpoints 2 keeps iter_3 and iter_4 (counted as a second 3, it pruned the real iter_3 with iter_2)."""
    work = tmp_path / "w"
    work.mkdir()
    for name in ("iter_2.safetensors", "iter_2.state.pt", "iter_3.safetensors", "iter_3.state.pt",
                 "iter_3.safetensors.bak"):  # fmt: skip
        (work / name).write_bytes(b"")

    class Model:  # what _save asks of the model
        def save(self, path):
            Path(path).write_bytes(b"weights")

    trainer = Trainer(_config(arch_file, generic, work, max_checkpoints=2))
    trainer._save(Model(), torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]),
                  torch.amp.GradScaler("cpu", enabled=False), 4, [{"cpu": torch.get_rng_state()}])  # fmt: skip
    assert sorted(n for n in os.listdir(work) if n.startswith("iter_")) == [
        "iter_3.safetensors", "iter_3.safetensors.bak", "iter_3.state.pt", "iter_4.safetensors", "iter_4.state.pt"]
    assert json.loads((work / "latest.json").read_text()) == {"iteration": 4, "model": "iter_4.safetensors",
                                                               "state": "iter_4.state.pt"}  # fmt: skip


def test_a_save_never_prunes_the_checkpoint_it_has_just_written(arch_file, generic, tmp_path):
    """A run resumed from an earlier state of its own work dir (--resume W/iter_2.state.pt, say with a lower lr)
    saves iteration 3 beside the first run's iter_4 (newer by number, never removed on resume): pruning to
    max_checkpoints by iteration number deleted the iter_3 just written, so latest.json named a deleted state and
    the resumed run's final weights were gone."""
    work = tmp_path / "w"
    work.mkdir()
    for i in (1, 2, 3, 4):  # the first run's, kept with max_checkpoints 0
        for suffix in (".safetensors", ".state.pt"):
            (work / f"iter_{i}{suffix}").write_bytes(b"first run")

    class Model:  # what _save asks of the model
        def save(self, path):
            Path(path).write_bytes(b"resumed run")

    parameter = torch.nn.Parameter(torch.zeros(1))
    trainer = Trainer(_config(arch_file, generic, work, max_checkpoints=1, iters=3))
    trainer._save(Model(), torch.optim.AdamW([parameter]), torch.amp.GradScaler("cpu", enabled=False), 3,
                  [{"cpu": torch.get_rng_state()}])  # fmt: skip
    latest = json.loads((work / "latest.json").read_text())
    assert (work / latest["state"]).is_file() and (work / latest["model"]).read_bytes() == b"resumed run"
