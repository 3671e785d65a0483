"""What a study asks the driver to run: a grid of known trials, or a searcher-driven stage.

A study's ``plan()`` yields stages one at a time; the driver runs each to its end before asking
for the next, so a later stage (plasticity probes) can be built from an earlier one's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from granet.study.base import TrialSpec

__all__ = ["GridStage", "SearchStage", "Stage"]


@dataclass
class GridStage:
    """Trials known in advance. ``trials`` are the ones still to run (the study leaves out the
    finished ones); ``planned`` counts the stage's whole grid."""

    name: str
    trials: list[TrialSpec]
    planned: int
    metric: str = "test_acc"
    mode: str = "max"


@dataclass
class SearchStage:
    """Trials a searcher proposes: ``num_samples`` of them from the base ``trial`` dict (a
    TrialSpec without key: the space function derives it with the sampled values)."""

    name: str
    trial: dict[str, Any]
    num_samples: int
    searcher: Any
    scheduler: Any = None
    metric: str = "test_acc"
    mode: str = "max"
    planned: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


Stage = GridStage | SearchStage
