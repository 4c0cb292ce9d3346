"""Accelerators: one file per method on the base classes of :mod:`mmfast.accel.base`.

Use them as objects (``Pool(factor=2)``) or by spec string (``"pool(factor=2)+kv_window(sink=4,recent=64)"``).
"""

from mmfast.accel.base import (
    REGISTRY,
    Accelerator,
    Composed,
    DecodeAccelerator,
    KVAccelerator,
    Stage,
    VisionAccelerator,
    available,
    build,
    compose,
    parse_spec,
    register,
    resolve,
)
from mmfast.accel.baselines import KVWindow, Pool, RandomKeep

__all__ = [
    "REGISTRY",
    "Accelerator",
    "Composed",
    "DecodeAccelerator",
    "KVAccelerator",
    "KVWindow",
    "Pool",
    "RandomKeep",
    "Stage",
    "VisionAccelerator",
    "available",
    "build",
    "compose",
    "parse_spec",
    "register",
    "resolve",
]
