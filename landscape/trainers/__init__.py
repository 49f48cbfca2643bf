"""Training: the loop (:func:`train`), named recipes, checkpoint schedules, data-parallel setup.

``landscape train`` resolves a :class:`~landscape.config.TrainConfig` with :func:`build_config` and calls
:func:`train`; see :mod:`landscape.trainers.loop` for the loop itself.
"""

from landscape.trainers.loop import TrainResult, check_config, evaluate, load_init_weights, train
from landscape.trainers.recipes import build_config, load_recipe, recipe_names, resolve_key, warmup_note
from landscape.trainers.schedule import checkpoint_steps, checkpoints_to_delete, log_spaced_steps

__all__ = [
    "TrainResult", "build_config", "check_config", "checkpoint_steps", "checkpoints_to_delete", "evaluate", "load_init_weights",
    "load_recipe", "log_spaced_steps", "recipe_names", "resolve_key", "train", "warmup_note",
]
