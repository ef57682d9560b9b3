"""Module paths from before the core was split into sub-packages keep importing: ``lightning_lora.core.inject``
is ``lightning_lora.core.surgery.inject``. Pickles (a ``torch.save``-d adapted model records its layer-type class's
module) and user code that imported a module by its old path keep working.

The finder is consulted only after the normal ones fail, so it never shadows a real module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Optional, Sequence

MOVED: dict[str, str] = {
    old: f"lightning_lora.core.{new}" for old, new in {
        "checks": "common.checks", "distributed": "common.distributed", "safe_files": "common.safe_files",
        "base_weights": "common.base_weights", "init_names": "config.init_names",
        "forward_plan": "layers.forward_plan", "layer_types": "layers.layer_types",
        "parameter_adapters": "layers.parameter_adapters", "adapter_tensors": "layers.adapter_tensors",
        "adapter_set": "layers.adapter_set", "summary": "layers.summary", "targeting": "targets.targeting",
        "quantized_weights": "quantization.quantized_weights", "initializers": "inits.initializers",
        "svd_init": "inits.svd_init", "loftq": "inits.loftq", "corda": "inits.corda", "eva": "inits.eva",
        "incremental_pca": "inits.incremental_pca", "calibration": "surgery.calibration",
        "nested_rank": "kinds.nested_rank", "inject": "surgery.inject", "removal": "surgery.removal",
        "merge": "surgery.merge", "state": "files.state", "adapter_files": "files.adapter_files",
        "peft_format": "files.peft_format", "peft_export": "files.peft_export",
        "merged_export": "files.merged_export", "combine": "composition.combine",
        "mixed_batch": "composition.mixed_batch", "xlora": "composition.xlora", "amlora": "composition.amlora",
        "continual": "composition.continual", "param_groups": "training.param_groups",
        "lorafa": "training.lorafa", "rank_allocation": "training.rank_allocation",
        "base_updates": "training.base_updates",
    }.items()
}
OLD_PREFIX = "lightning_lora.core."


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if not fullname.startswith(OLD_PREFIX) or fullname[len(OLD_PREFIX):] not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name[len(OLD_PREFIX):]])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the real module is already executed


def install() -> None:
    """Add the finder once (appended: the normal finders come first)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
