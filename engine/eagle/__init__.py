"""EAGLE-3 draft heads: the head module, its config and folder format. The proposer that drafts with
a head is engine.proposers.eagle."""

from engine.eagle.config import EagleConfig, default_aux_layers
from engine.eagle.head import EagleHead
from engine.eagle.io import check_compatible, is_eagle_folder, load_head, save_head

__all__ = ["EagleConfig", "EagleHead", "check_compatible", "default_aux_layers", "is_eagle_folder", "load_head",
           "save_head"]
