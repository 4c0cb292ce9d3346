"""Typed errors raised by mmfast.

Every error a user can cause (bad media, bad spec, unsupported model) is an :class:`MMFastError`
subclass with a message that says what was wrong and what to do, so callers can catch one base class
and never see a stack trace from deep inside torch or a decoder library.
"""

from __future__ import annotations


class MMFastError(Exception):
    """Base class of every error mmfast raises on purpose."""


class InvalidInputError(MMFastError, ValueError):
    """Unreadable, corrupt, empty or absurd media; a missing question; inputs of the wrong type."""


class UnsupportedModelError(MMFastError):
    """The model (class, family or checkpoint) is not supported by mmfast or cannot be loaded."""


class IncompatibleAcceleratorError(MMFastError):
    """An accelerator cannot be applied to this model / task, or two accelerators cannot be combined."""


class ConfigError(MMFastError, ValueError):
    """An unknown accelerator name, an unknown parameter or a parameter out of range."""


__all__ = [
    "MMFastError",
    "InvalidInputError",
    "UnsupportedModelError",
    "IncompatibleAcceleratorError",
    "ConfigError",
]
