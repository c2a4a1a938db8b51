"""ARC data: tasks, tokens, augmentations, episodes and the Lightning datamodule."""

from trm_lightning.data.arc import BUILTIN_SOURCES, ArcTask, load_source, validate_grid
from trm_lightning.data.augment import (
    Augmentation,
    augmentation_for,
    dihedral,
    inverse_dihedral,
    translation_for,
)
from trm_lightning.data.datamodule import ARCDataModule
from trm_lightning.data.episodes import EpisodeDataset, EpisodeKey, EpisodeSampler, KeyedEpisodes, eval_keys
from trm_lightning.data.fewshot_rules import make_fewshot_split
from trm_lightning.data.synthetic import make_synthetic_tasks
from trm_lightning.data.task_json import write_task_dir
from trm_lightning.data.tokenize import canvas_labels, crop_canvas, grid_to_canvas

__all__ = [
    "ARCDataModule",
    "ArcTask",
    "Augmentation",
    "BUILTIN_SOURCES",
    "EpisodeDataset",
    "EpisodeKey",
    "EpisodeSampler",
    "KeyedEpisodes",
    "augmentation_for",
    "canvas_labels",
    "crop_canvas",
    "dihedral",
    "eval_keys",
    "grid_to_canvas",
    "inverse_dihedral",
    "load_source",
    "make_fewshot_split",
    "make_synthetic_tasks",
    "translation_for",
    "validate_grid",
    "write_task_dir",
]
