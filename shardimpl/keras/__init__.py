"""The Keras integration: `keras.distribution` driving shardimpl on Keras' torch backend.

`install()` applies every row of `shardimpl.keras.patches.patch_table` (all or
nothing) and `uninstall()` undoes them exactly. With no distribution set Keras
behaves as stock. Supported: keras 3.15.x and keras-nightly 3.16.dev.

From ``import shardimpl`` on, Keras' empty torch ``distribution_lib`` slot
holds `before_install` (``keras.distribution.initialize()`` works before
`install()`; the rest names it): `patches.before_install_table`.

Modules: `backend` (Keras' distribution_lib vocabulary for torch),
`variables` (sharded creation and the per-variable guard), `steps` (trainer
steps and data), `saving` (conversion, assignment, saving), `rules` (DTensor
sharding rules), `optimizers` (optimizer updates on local shards, in bounded
chunks), `dense`, `attention` and `norms` (sharded layers' math on local
blocks), `remat` (keras.RematScope's checkpoints without early stop),
`patches` (the table), `compat` (private Keras names by version), `active`
(the installed switch).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys

from shardimpl.keras import active

__all__ = ["install", "uninstall", "installed", "is_installed"]

_applied: list = []
_KERAS_DISTRIBUTION = "keras.src.distribution.distribution_lib"


class _ThenCall(importlib.abc.Loader):
    """A module's own loader, then ``callback()`` once the module has run."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after module ``name`` is first imported; then steps aside."""

    def __init__(self, name: str, callback):
        self._name, self._callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self._name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, self._callback)
        return spec


def _fill_keras_slot() -> None:
    from shardimpl.keras.patches import apply_before_install

    apply_before_install()


def _prepare_keras() -> None:
    """Give Keras' empty torch ``distribution_lib`` slot `shardimpl.keras.before_install` (see
    `shardimpl.keras.patches.before_install_table`): now if Keras is imported, else right after
    it is. Imports no Keras itself."""
    if _KERAS_DISTRIBUTION in sys.modules:
        _fill_keras_slot()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_KERAS_DISTRIBUTION, _fill_keras_slot))


_prepare_keras()


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
