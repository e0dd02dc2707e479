"""shardimpl: Keras/PyTorch variables created already sharded across ranks.

Each rank creates, holds and ever allocates only its own shard of a sharded
variable; `all_gather_variable` rebuilds a full tensor only where one is
really needed (saving, export).

Importing shardimpl selects Keras' torch backend (``KERAS_BACKEND=torch``)
unless a backend was already chosen: it is the torch backend's distribution
library.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from shardimpl.create import distribute_variable
from shardimpl.checkpoint import load_sharded, save_sharded
from shardimpl.gather import all_gather_variable
from shardimpl.keras_hook import install, installed, uninstall
from shardimpl.layout import TorchLayout, local_shard_bounds, resolve_layout, to_torch_mesh

__all__ = [
    "distribute_variable",
    "all_gather_variable",
    "install",
    "uninstall",
    "installed",
    "save_sharded",
    "load_sharded",
    "TorchLayout",
    "resolve_layout",
    "to_torch_mesh",
    "local_shard_bounds",
]

__version__ = "0.1.0"
