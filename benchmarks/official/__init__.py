"""The official DenseCLIP pipeline, reproduced without mmcv/mmseg (see model.py)."""

from .model import (
    OfficialDenseCLIP,
    official_config,
    randomize_,
    save_mmcv_checkpoint,
    score_channel_gain,
    weigh_score_channels_,
)

__all__ = [
    "OfficialDenseCLIP",
    "official_config",
    "randomize_",
    "save_mmcv_checkpoint",
    "score_channel_gain",
    "weigh_score_channels_",
]
