"""Sharded checkpoints: each rank writes its shards; N = 2 loads at N = 4 and unsharded; failures are safe."""

from __future__ import annotations

import os

import numpy as np
import pytest

import _checkpoint_world
from _rows import ok_values as _ok
from shardimpl import launch

pytestmark = pytest.mark.distributed


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ckpt") / "step1")
    values = _ok(launch.run(_checkpoint_world.save, 2, folder, timeout=180))
    return folder, values


def test_each_rank_writes_only_its_own_shards(saved):
    folder, values = saved
    assert all(v["error"] is None for v in values)
    files = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".distcp")}
    assert len(files) == 2
    total = sum(v["local_bytes"] for v in values)
    for v in values:
        assert v["local_bytes"] <= 0.55 * total
        assert v["peak"] <= v["local_bytes"] + (1 << 20)  # no gather: at most its shards staged
    for size in files.values():
        assert size < 0.7 * total  # neither file holds the whole model


def test_checkpoint_from_2_ranks_loads_exactly_at_4_ranks(saved):
    folder, values = saved
    loaded = _ok(launch.run(_checkpoint_world.load, 4, folder, timeout=180))
    for v in loaded:
        _equal(v["weights"], values[0]["weights"])
        assert any(not np.array_equal(a, b) for a, b in zip(v["before"], v["weights"]))
        assert v["slots"] and any(np.abs(s).sum() > 0 for s in v["slots"])


def test_checkpoint_from_2_ranks_loads_exactly_unsharded(saved):
    folder, values = saved
    single = _ok(launch.run(_checkpoint_world.load, 1, folder, False, timeout=180))[0]
    _equal(single["weights"], values[0]["weights"])


def test_a_rank_failing_mid_save_leaves_the_previous_checkpoint_loadable(saved):
    folder, values = saved
    failed = _ok(launch.run(_checkpoint_world.save, 2, folder, 1, timeout=180))
    assert all(v["error"] for v in failed), failed  # every rank learns that the save failed
    assert "disk full" in " ".join(v["error"] for v in failed)
    leftovers = [f for f in os.listdir(os.path.dirname(folder)) if "partial" in f]
    assert not leftovers
    loaded = _ok(launch.run(_checkpoint_world.load, 2, folder, timeout=180))
    _equal(loaded[0]["weights"], values[0]["weights"])


def test_a_rank_that_does_not_see_every_file_of_the_checkpoint_refuses_to_commit(tmp_path):
    """What each rank checks after DCP's write (node-local disks: a node sees only its own files)."""
    from types import SimpleNamespace

    from shardimpl import checkpoint

    partial = tmp_path / ".ckpt.partial-0123456789ab"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x" * 100)  # this node's rank wrote it; rank 1's is elsewhere
    storage = {i: SimpleNamespace(relative_path=name, offset=0, length=100)
               for i, name in enumerate(["__0_0.distcp", "__1_0.distcp"])}
    metadata = SimpleNamespace(storage_data=storage)
    checkpoint._VISIBLE_WAIT_SECONDS, saved = 0.0, checkpoint._VISIBLE_WAIT_SECONDS
    try:
        with pytest.raises(ValueError, match="shared by all nodes at the same path") as info:
            checkpoint._check_every_file_visible(str(partial), metadata, str(tmp_path / "ckpt"), "save_sharded")
        assert "['.metadata', '__1_0.distcp'] (written by rank(s) [1])" in str(info.value)
        (partial / "__1_0.distcp").write_bytes(b"x" * 100)
        (partial / ".metadata").write_bytes(b"m")
        checkpoint._check_every_file_visible(str(partial), metadata, str(tmp_path / "ckpt"), "save_sharded")
        (partial / "__1_0.distcp").write_bytes(b"x" * 10)  # shorter than the metadata says: not all there
        with pytest.raises(ValueError, match=r"does not see \['__1_0.distcp'\]"):
            checkpoint._check_every_file_visible(str(partial), metadata, str(tmp_path / "ckpt"), "save_sharded")
    finally:
        checkpoint._VISIBLE_WAIT_SECONDS = saved
