"""Training: DenseCLIP fine-tuning on the fused operators, one GPU to many (torchrun), and evaluation.

    from denseclip_fast.train import TrainConfig, train, train_preset
    cfg = train_preset("RN50"); cfg.data = "ADEChallengeData2016"; cfg.init = "RN50.pt"; cfg.accum = 4
    train(cfg)                                          # or: denseclip-fast train --arch RN50 --data ... --accum 4

Modules: config.py (TrainConfig, the official recipes), data.py (layouts, augmentation, sampler), optim.py
(parameter groups, schedule, loss), step.py (the model as it trains, the module DDP wraps), loop.py (the trainer),
launch.py (torchrun's environment, process group), state.py (the saved training state a resume reads), workdir.py
(the work dir's lock), evaluate.py (mIoU, aAcc).
"""

from .config import TrainConfig, train_preset
from .data import SegmentationData
from .evaluate import ClassMetrics, Evaluation, Metrics, SegmentationMetrics, evaluate
from .loop import Trainer, TrainResult, train

__all__ = [
    "ClassMetrics",
    "Evaluation",
    "Metrics",
    "SegmentationData",
    "SegmentationMetrics",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "train",
    "train_preset",
]
