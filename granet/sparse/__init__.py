"""The GraNet sparse-training engine (pure PyTorch; knows nothing of Ray, Optuna or MLflow)."""

from granet.sparse.engine import (
    LayerCollapseWarning,
    MaskedLayer,
    SparseEngine,
    UnmaskedWeightWarning,
    prunable_layers,
)
from granet.sparse.flops import FlopCount, count_forward_flops
from granet.sparse.init import layer_densities, random_mask
from granet.sparse.methods import PRESETS, Preset, preset_for
from granet.sparse.prune import filter_prune, global_magnitude, layerwise_magnitude, topk_mask
from granet.sparse.schedules import PruneWindow, gmp_sparsity, is_update_step, regen_rate
from granet.sparse.select import ParamInfo, classify_parameters

__all__ = [
    "SparseEngine",
    "MaskedLayer",
    "prunable_layers",
    "LayerCollapseWarning",
    "UnmaskedWeightWarning",
    "ParamInfo",
    "classify_parameters",
    "FlopCount",
    "count_forward_flops",
    "layer_densities",
    "random_mask",
    "PRESETS",
    "Preset",
    "preset_for",
    "topk_mask",
    "global_magnitude",
    "layerwise_magnitude",
    "filter_prune",
    "PruneWindow",
    "gmp_sparsity",
    "is_update_step",
    "regen_rate",
]
