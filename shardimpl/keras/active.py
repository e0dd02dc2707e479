"""The one switch every hook reads: is the integration installed, and which distribution is set.

A leaf module (no shardimpl imports) so that the per-variable guard, the
steps and the installer can all read it without importing each other.
"""

from __future__ import annotations

__all__ = ["is_installed", "set_installed", "current_distribution"]

_state = {"installed": False}


def is_installed() -> bool:
    return _state["installed"]


def set_installed(flag: bool) -> None:
    _state["installed"] = bool(flag)


def current_distribution():
    """Keras' global distribution (None when unset); None too when Keras is absent."""
    from keras.src.distribution import distribution_lib

    return distribution_lib.distribution()
