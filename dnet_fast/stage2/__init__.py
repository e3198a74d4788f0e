"""Decoupled stage 2 (SPEC §7): cRT, LWS, τ-norm and LAS on the frozen backbone of a finished stage-1 run.

``methods`` holds the STAGE2_METHODS registry, the stage-2 head and the LAS loss (imported here, so the config
check knows the names); ``features`` the frozen-backbone features; ``train`` the run itself
(``from dnet_fast.stage2.train import load_stage2_config, fit_stage2``), imported on demand.
"""

from __future__ import annotations

from dnet_fast.stage2.methods import (
    STAGE2_METHODS,
    TAU_NORMS,
    LabelAwareSmoothing,
    Stage2Head,
    Stage2Method,
    las_epsilons,
    stage2_model,
    tau_norm_weight,
)

__all__ = [
    "STAGE2_METHODS",
    "TAU_NORMS",
    "LabelAwareSmoothing",
    "Stage2Head",
    "Stage2Method",
    "las_epsilons",
    "stage2_model",
    "tau_norm_weight",
]
