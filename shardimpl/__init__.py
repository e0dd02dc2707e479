"""shardimpl: Keras/PyTorch variables created already sharded across ranks.

Each rank creates, holds and ever allocates only its own shard of a sharded
variable; `gather_variable` rebuilds a full tensor only where one is really
needed (saving, export).

The core (`distribute_variable`, `gather_variable`, `TorchLayout`, layouts,
shard-local initializers, `save_sharded` / `load_sharded`) needs torch only.
The Keras integration is `shardimpl.keras` (`install`, `uninstall`,
`installed` are re-exported here and import Keras only when called).
`initialize(timeout=...)` joins the world a launcher started (torchrun,
srun, or MASTER_ADDR/RANK/WORLD_SIZE): `shardimpl.rendezvous`.

Importing shardimpl selects Keras' torch backend (``KERAS_BACKEND=torch``)
unless a backend was already chosen: it is the torch backend's distribution
library.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from shardimpl.checkpoint import load_sharded, save_sharded
from shardimpl.create import distribute_variable
from shardimpl.gather import all_gather_variable, gather_variable
from shardimpl.initializers import InitSpec
from shardimpl.keras import install, installed, is_installed, uninstall
from shardimpl.layout import TorchLayout, local_shard_bounds
from shardimpl.mesh import resolve_layout, to_torch_mesh
from shardimpl.rendezvous import initialize

__all__ = [
    "distribute_variable",
    "gather_variable",
    "all_gather_variable",
    "InitSpec",
    "install",
    "initialize",
    "uninstall",
    "installed",
    "is_installed",
    "save_sharded",
    "load_sharded",
    "TorchLayout",
    "resolve_layout",
    "to_torch_mesh",
    "local_shard_bounds",
]

__version__ = "0.1.0"
