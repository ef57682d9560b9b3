"""Target types, one file each, one line each in :data:`TARGET_PLANNERS` (in the order they claim modules)."""

from lightning_lora.core.surgery.sites.attention import AttentionSites
from lightning_lora.core.surgery.sites.base import PlannedSite, TargetContext, TargetPlanner
from lightning_lora.core.surgery.sites.modules import ModuleTargets
from lightning_lora.core.surgery.sites.parameters import ParameterTargets
from lightning_lora.core.surgery.sites.token_rows import TokenRows

TARGET_PLANNERS: tuple[TargetPlanner, ...] = (AttentionSites(), ModuleTargets(), TokenRows(), ParameterTargets())

__all__ = ["TARGET_PLANNERS", "PlannedSite", "TargetContext", "TargetPlanner"]
