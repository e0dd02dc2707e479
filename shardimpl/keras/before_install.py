"""Keras' torch ``distribution_lib`` until `shardimpl.install()`: joining works, the rest names install().

Stock Keras sets the torch backend's ``distribution_lib`` to None, so
``keras.distribution.initialize()`` before ``shardimpl.install()`` (the order
a torchrun script naturally takes) failed with "'NoneType' object has no
attribute 'initialize'". From ``import shardimpl`` on, that empty slot holds
this module (the import-stage rows of `shardimpl.keras.patches`):
``initialize``, ``num_processes``, ``process_id``, ``list_devices`` and
``get_device_count`` work (they join or describe the world and change nothing
in Keras); any other name Keras asks for (a mesh, a layout, a distributed
tensor) raises AttributeError saying to call ``shardimpl.install()`` first.
`install()` replaces it with `shardimpl.keras.backend`; `uninstall()` puts it back.
"""

from __future__ import annotations

from shardimpl.keras.backend import get_device_count, initialize, list_devices, num_processes, process_id

__all__ = ["initialize", "num_processes", "process_id", "list_devices", "get_device_count"]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"keras.distribution on the torch backend lays out variables and tensors only after "
        f"shardimpl.install(): Keras asked for distribution_lib.{name}, which install() provides. "
        "Call shardimpl.install() before building meshes, layouts or models (joining the world with "
        "keras.distribution.initialize() works before or after it)."
    )
