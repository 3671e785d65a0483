"""The six methods of SPEC §4.3 as presets of one engine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "preset_for"]


@dataclass(frozen=True)
class Preset:
    """What a method does: start sparse?, gradual prune?, regenerate (and with which score)?"""

    name: str
    start: str  # "dense" (d=1), "final" (d_f from the start), "init" (d_i)
    gradual_prune: bool
    regenerate: bool
    default_growth: str | None


PRESETS: dict[str, Preset] = {
    "dense": Preset("dense", "dense", False, False, None),
    "static": Preset("static", "final", False, False, None),
    "set": Preset("set", "final", False, True, "random"),
    "rigl": Preset("rigl", "final", False, True, "gradient"),
    "gmp": Preset("gmp", "init", True, False, None),
    "granet": Preset("granet", "init", True, True, "gradient"),
}


def preset_for(method: str) -> Preset:
    try:
        return PRESETS[method]
    except KeyError:
        raise ValueError(
            f"sparsity.method={method!r}: must be one of {', '.join(PRESETS)}"
        ) from None
