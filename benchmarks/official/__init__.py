"""The official DenseCLIP pipeline, reproduced without mmcv/mmseg (see model.py)."""

from .model import OfficialDenseCLIP, official_config, randomize_, save_mmcv_checkpoint

__all__ = ["OfficialDenseCLIP", "official_config", "randomize_", "save_mmcv_checkpoint"]
