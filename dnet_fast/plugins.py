"""Every plugin family's registry by config key, and the one check of a config's plugin names against them.

Where a new plugin goes: a dataset into ``dnet_fast.data.DATASETS``, a loader into ``LOADERS``, a backbone into
``dnet_fast.models.MODELS``, a head into ``HEADS``, a loss into ``dnet_fast.losses.LOSSES``, a meta mode into
``dnet_fast.meta.META_MODES``, a meta-gradient algorithm into ``META_GRADIENTS``, an lr schedule into
``dnet_fast.schedule.SCHEDULES``, a stage-2 method into ``dnet_fast.stage2.STAGE2_METHODS``. Registering is all it takes: this table makes the config key accept the name.
"""

from __future__ import annotations

from collections.abc import Iterable

from dnet_fast.config import TrainConfig
from dnet_fast.data import DATASETS, LOADERS
from dnet_fast.losses import LOSSES
from dnet_fast.meta import META_GRADIENTS, META_MODES
from dnet_fast.models import HEADS, MODELS
from dnet_fast.registry import Registry
from dnet_fast.schedule import SCHEDULES
from dnet_fast.stage2.methods import STAGE2_METHODS

__all__ = ["PLUGIN_KEYS", "check_names"]

#: (section, key) -> (registry, extra accepted values).
PLUGIN_KEYS: dict[tuple[str, str], tuple[Registry, tuple[str, ...]]] = {
    ("data", "dataset"): (DATASETS, ()),
    ("data", "loader"): (LOADERS, ("auto",)),
    ("model", "backbone"): (MODELS, ()),
    ("model", "head"): (HEADS, ()),
    ("optim", "schedule"): (SCHEDULES, ()),
    ("loss", "name"): (LOSSES, ()),
    ("meta", "mode"): (META_MODES, ()),
    ("meta", "grad"): (META_GRADIENTS, ()),
    ("stage2", "method"): (STAGE2_METHODS, ("none",)),
    ("stage2", "schedule"): (SCHEDULES, ()),
}


def _valid(registry: Registry, extra: Iterable[str]) -> list[str]:
    return [*extra, *registry.names()]


def check_names(cfg: TrainConfig) -> TrainConfig:
    """Checks every plugin name of ``cfg`` against its registry; returns ``cfg``.

    Run by every entry point right after ``load_config`` and before anything is written.

    Raises:
        ValueError: a name is not registered (the message names the key and lists the valid names).
    """
    for (section, key), (registry, extra) in PLUGIN_KEYS.items():
        value = getattr(getattr(cfg, section), key)
        valid = _valid(registry, extra)
        if value not in valid:
            msg = f"invalid config value {section}.{key}: unknown value '{value}'; valid: {', '.join(valid)}"
            raise ValueError(msg)
    return cfg
