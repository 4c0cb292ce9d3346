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

from mmfast.accel.sjd import SJD  # noqa: E402  (registers "sjd")

__all__ += ["SJD"]

from mmfast.accel.turbo import Turbo  # noqa: E402  (registers "turbo")

__all__ += ["Turbo"]

from mmfast.accel.tokenflex import AdaptivePool, TokenFlex  # noqa: E402  (registers "adaptive_pool", "tokenflex")

__all__ += ["AdaptivePool", "TokenFlex"]

from mmfast.accel.lookm import LookM  # noqa: E402  (registers "lookm")
from mmfast.accel.zipvl import ZipVL  # noqa: E402  (registers "zipvl")

__all__ += ["LookM", "ZipVL"]
from mmfast.accel.gsd import GSD  # noqa: E402
from mmfast.accel.lantern import Lantern  # noqa: E402

__all__ += ["GSD", "Lantern"]
from mmfast.accel.eagle import EagleSD  # noqa: E402

__all__ += ["EagleSD"]
