"""The Keras integration: `keras.distribution` driving shardimpl on Keras' torch backend.

`install()` applies every row of `shardimpl.keras.patches.patch_table` (all or
nothing) and `uninstall()` undoes them exactly. With no distribution set Keras
behaves as stock. Supported: keras 3.15.x and keras-nightly 3.16.dev.

Modules: `backend` (Keras' distribution_lib vocabulary for torch),
`variables` (sharded creation and the per-variable guard), `steps` (trainer
steps and data), `saving` (conversion, assignment, saving), `rules` (DTensor
sharding rules), `optimizers` (optimizer updates on local shards, in bounded
chunks), `patches` (the table), `compat` (private Keras names by version),
`active` (the installed switch).
"""

from __future__ import annotations

import contextlib

from shardimpl.keras import active

__all__ = ["install", "uninstall", "installed", "is_installed"]

_applied: list = []


def is_installed() -> bool:
    return active.is_installed()


def install() -> None:
    """Route Keras' torch backend through shardimpl (idempotent; all or nothing).

    Applies every patch of `shardimpl.keras.patches.patch_table`. If one fails,
    the ones already applied are undone and the error is raised: Keras is left
    exactly as it was.
    """
    if active.is_installed():
        return
    from shardimpl.keras.compat import check_keras

    check_keras()
    from shardimpl.keras.patches import apply_all, patch_table

    _applied[:] = apply_all(patch_table())
    active.set_installed(True)


def uninstall() -> None:
    """Restore stock Keras and DTensor's own sharding rules exactly (idempotent)."""
    from shardimpl.keras.patches import undo_all

    active.set_installed(False)
    undo_all(_applied)


@contextlib.contextmanager
def installed():
    """``with shardimpl.installed(): ...``: the integration for one block."""
    was = is_installed()
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
