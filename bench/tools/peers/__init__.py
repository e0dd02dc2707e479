"""Peers measured beside shardimpl in one report (`python -m bench peers`).

A peer is another way to get a model-parallel Keras model, run on the same families at the
same sizes and N, returning rows in the harness' shape (`bench.harness.scenarios.rows_for`)
with the peer's name as their mode. `PEERS` is the registry: a name, one line on what it is,
and a runner ``run(args, scenarios, *, log) -> (rows, meta)``. A peer that cannot be installed
or run returns error rows; one that raises is caught here and becomes error rows too, so a peer
never stops the report. Its failures are rows and a line in the verdict, not the exit status.

* ``keras-jax`` (`bench.tools.peers.keras_jax`): Keras 3.15.1 on JAX with the family's map,
  N devices in one process, in its own virtualenv.
* ``keras-native`` (`bench.tools.peers.keras_native`): keras-nightly's torch ModelParallel, in
  its own virtualenv, on the family's map or, where that fails there, the previous width-split map.
* ``fsdp2`` (`bench.tools.peers.fsdp2`): torch's ``fully_shard`` on the families as plain torch
  modules, built on the meta device and initialized shard by shard, N rank processes here.

``naive`` is a mode of the harness itself (`bench.harness.naive`), run with stock Keras and
shardimpl in this environment. A new peer is one module with a ``run`` and
one `Peer` line here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from bench.tools.peers import fsdp2, keras_jax, keras_native
from bench.tools.peers.rows import failed_rows

__all__ = ["Peer", "PEERS", "run_peers", "peer_names"]


@dataclass(frozen=True)
class Peer:
    name: str  # the mode its rows carry
    what: str  # one line, for --help and the report's run details
    run: Callable  # run(args, scenarios, *, log) -> (rows, meta)


PEERS = {p.name: p for p in (
    Peer(keras_jax.NAME, "Keras 3.15.1 on JAX, ModelParallel on N devices of one process", keras_jax.run),
    Peer(keras_native.NAME, "keras-nightly's own torch ModelParallel (builds full, then scatters)", keras_native.run),
    Peer(fsdp2.NAME, "torch's fully_shard (FSDP2) per block on plain torch modules, meta-device init per shard",
         fsdp2.run),
)}


def peer_names() -> tuple[str, ...]:
    return tuple(PEERS)


def run_peers(args, scenarios_for_peer, names=None, *, log=sys.stderr):
    """Rows of every peer in ``names`` (default: all), and {name: meta}.

    ``scenarios_for_peer(name)`` lists the (unbudgeted) scenarios a peer runs, with its name as mode.
    """
    rows, metas = [], {}
    for name in names or peer_names():
        peer = PEERS[name]
        scenarios = scenarios_for_peer(name)
        try:
            new, meta = peer.run(args, scenarios, log=log)
        except Exception as exc:  # a peer's bug is its failure, shown as rows; the report still comes
            new, meta = failed_rows(scenarios, f"{name} runner failed: {type(exc).__name__}: {exc}"), {}
        rows += new
        metas[name] = {"what": peer.what, **(meta or {})}
    return rows, metas
