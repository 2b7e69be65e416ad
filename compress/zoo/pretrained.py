"""The zoo models' timm pretrained_cfg: timm's fields plus the image sets each model calibrates on
and is scored on (``calibration`` / ``evaluation``: a calibration_data set name).

Each model module registers its cfgs with timm (a module-level ``default_cfgs``, read by
``@register_model``), so ``timm.models.get_pretrained_cfg(name)`` answers for a bare name and the
built model carries the same dict as its ``pretrained_cfg``; calibration_data reads the two sets
from either. A model whose cfg names none gets the generic bundled default.
"""
from __future__ import annotations

from dataclasses import dataclass

from timm.models import PretrainedCfg, get_pretrained_cfg


@dataclass
class ZooCfg(PretrainedCfg):
    calibration: str | None = None   # e.g. "cifar10-calib" (bundled) or "cifar10:train" (a split)
    evaluation: str | None = None


def pretrained_cfg(name: str) -> dict:
    """The cfg registered for zoo model ``name``, as the dict a built model carries."""
    return get_pretrained_cfg(name).to_dict()
