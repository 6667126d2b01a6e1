"""The framework-independent engine: the IPCV state machine over a ViT's blocks (``vision``) and
the one per-instance patch mechanism every patch of this package uses (``patching``).

Family adapters (``FamilyAdapter`` subclasses) tell the engine where blocks, items, segments and
rotary tables live; the Hugging Face ones are in ``ipcv_kernels.models``.
"""

from .patching import InstancePatch
from .vision import (
    PATCH_ATTRIBUTE,
    BlockCall,
    FamilyAdapter,
    ForwardState,
    IPCVPatch,
    TowerCall,
    gather_rotary,
    read_blocks,
)

__all__ = [
    "PATCH_ATTRIBUTE",
    "BlockCall",
    "FamilyAdapter",
    "ForwardState",
    "IPCVPatch",
    "InstancePatch",
    "TowerCall",
    "gather_rotary",
    "read_blocks",
]
