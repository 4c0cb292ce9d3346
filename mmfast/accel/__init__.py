"""Accelerators: one file per method on the stage base classes of :mod:`mmfast.accel.base`.

Use them as objects (``Pool(factor=2)``) or by spec string (``"pool(factor=2)+kv_window(sink=4,recent=64)"``,
:mod:`mmfast.accel.spec`). Importing this package registers every built-in method.
"""

from mmfast.accel.base import (
    REGISTRY,
    Accelerator,
    DecodeAccelerator,
    KVAccelerator,
    PrefillAccelerator,
    StreamAccelerator,
    VisionAccelerator,
    register,
)
from mmfast.accel.baselines import KVWindow, Pool, RandomKeep
from mmfast.accel.code import CoDe
from mmfast.accel.eagle import EagleSD
from mmfast.accel.fastv import FastV
from mmfast.accel.gsd import GSD
from mmfast.accel.lantern import Lantern
from mmfast.accel.lookm import LookM
from mmfast.accel.sjd import SJD
from mmfast.accel.spec import Composed, available, build, compose, get, parse_spec, resolve  # noqa: I001 (after the methods)
from mmfast.accel.tokenflex import AdaptivePool, TokenFlex
from mmfast.accel.turbo import Turbo
from mmfast.accel.videoscan import VideoScan
from mmfast.accel.visionzip import VisionZip
from mmfast.accel.zipvl import ZipVL
from mmfast.types import Stage

__all__ = [
    "GSD",
    "REGISTRY",
    "SJD",
    "Accelerator",
    "AdaptivePool",
    "CoDe",
    "Composed",
    "DecodeAccelerator",
    "EagleSD",
    "FastV",
    "KVAccelerator",
    "KVWindow",
    "Lantern",
    "LookM",
    "Pool",
    "PrefillAccelerator",
    "RandomKeep",
    "Stage",
    "StreamAccelerator",
    "TokenFlex",
    "Turbo",
    "VisionAccelerator",
    "VideoScan",
    "VisionZip",
    "ZipVL",
    "available",
    "build",
    "compose",
    "get",
    "parse_spec",
    "register",
    "resolve",
]
