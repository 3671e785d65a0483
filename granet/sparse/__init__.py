"""The GraNet sparse-training engine (pure PyTorch; knows nothing of Ray, Optuna or MLflow)."""

from granet.sparse.engine import MaskedLayer, SparseEngine, prunable_layers
from granet.sparse.init import layer_densities, random_mask
from granet.sparse.methods import PRESETS, Preset, preset_for
from granet.sparse.prune import filter_prune, global_magnitude, layerwise_magnitude, topk_mask
from granet.sparse.schedules import PruneWindow, gmp_sparsity, is_update_step, regen_rate

__all__ = [
    "SparseEngine",
    "MaskedLayer",
    "prunable_layers",
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
