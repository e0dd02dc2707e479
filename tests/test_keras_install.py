"""The Keras integration in one process: install/uninstall round trips, all-or-nothing
install, the guard on sharded variables, stock behaviour without a distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import pytest
import torch
from torch.distributed.tensor import DTensor

import shardimpl
from shardimpl.keras import compat, patches, rules


def _round_trip_report():
    """Round trips and injected failures, each compared with a pristine snapshot taken in a
    fresh interpreter (this one has installed shardimpl before)."""
    script = os.path.join(os.path.dirname(__file__), "_install_roundtrip.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "KERAS_BACKEND": "torch"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def round_trip():
    return _round_trip_report()


def _mesh_and_model_parallel():
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
    lm = keras.distribution.LayoutMap(mesh)
    lm[".*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=lm)


@pytest.fixture
def no_distribution():
    yield
    keras.distribution.set_distribution(None)
    shardimpl.uninstall()


def test_install_then_uninstall_restores_every_keras_attribute_dtensor_table_and_environ(round_trip):
    assert round_trip["install_changes_something"] >= 15  # the snapshot does see the patches
    assert round_trip["round_trip"] == []
    assert round_trip["round_trip_after_failures"] == []


@pytest.mark.parametrize("where", ["first", "early", "middle", "dtensor rules", "last"])
def test_a_failure_in_the_middle_of_install_leaves_keras_exactly_as_before(round_trip, where):
    keys = sorted((k for k in round_trip if k.startswith("fail_at_")), key=lambda k: int(k[8:]))
    key = keys[["first", "early", "middle", "dtensor rules", "last"].index(where)]
    assert round_trip[key] == []


def test_every_row_of_the_patch_table_is_applied_and_says_why():
    table = patches.patch_table()
    assert len(table) >= 15
    shardimpl.install()
    try:
        for row in table:
            assert row.why and row.owner and row.attribute
            if row.kind == "attribute":
                for target in row.targets():
                    assert row.attribute in vars(target), (row.owner, row.attribute)
    finally:
        shardimpl.uninstall()
    assert "| owner | attribute | why |" in patches.describe_table()


def test_dtensor_rules_are_active_only_while_installed():
    mm, emb = torch.ops.aten.mm.default, torch.ops.aten.embedding_dense_backward.default
    tables = rules.strategy_tables()
    stock = {name: (table.get(mm), table.get(emb)) for name, table in tables.items()}
    with shardimpl.installed():
        assert tables["op_single_dim_strategy_funcs"].get(mm) is not stock["op_single_dim_strategy_funcs"][0]
        assert tables["op_strategy_funcs"].get(emb) is not stock["op_strategy_funcs"][1]
    assert {name: (table.get(mm), table.get(emb)) for name, table in tables.items()} == stock


def test_without_a_distribution_variables_stay_plain_parameters(no_distribution):
    shardimpl.install()
    keras.distribution.set_distribution(None)
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    assert not isinstance(layer.kernel.value, DTensor)
    assert isinstance(layer.kernel.value, torch.nn.Parameter)


def test_a_model_parallel_layout_is_no_longer_ignored(no_distribution):
    shardimpl.install()
    keras.distribution.set_distribution(_mesh_and_model_parallel())
    layer = keras.layers.Dense(6)
    layer.build((None, 5))
    assert isinstance(layer.kernel.value, DTensor)
    assert str(layer.kernel.value.placements) == "(Shard(dim=1),)"
    assert layer.kernel.numpy().shape == (5, 6)
    assert isinstance(layer.bias.value, DTensor)  # unmatched: replicated


def test_a_sharded_model_used_after_uninstall_raises_one_clear_error(no_distribution):
    from shardimpl.keras.variables import ShardedVariableError, is_sharded_variable

    shardimpl.install()
    keras.distribution.set_distribution(_mesh_and_model_parallel())
    layer = keras.layers.Dense(6, name="proj")
    layer.build((None, 5))
    assert is_sharded_variable(layer.kernel)
    x = torch.ones(2, 5)
    shardimpl.uninstall()
    with pytest.raises(ShardedVariableError, match=r"'proj/kernel' was created sharded by shardimpl.*"
                                                   r"shardimpl is not installed any more.*shardimpl.install\(\)"):
        layer(x)
    with pytest.raises(ShardedVariableError, match="not installed"):
        layer.kernel.numpy()
    shardimpl.install()
    keras.distribution.set_distribution(None)
    with pytest.raises(ShardedVariableError, match="no keras.distribution is set"):
        layer.get_weights()
    # Back under its distribution, the same variable works again.
    keras.distribution.set_distribution(_mesh_and_model_parallel())
    assert layer.kernel.numpy().shape == (5, 6)
    # Stock variables of the same class are untouched by the guard.
    keras.distribution.set_distribution(None)
    plain = keras.layers.Dense(3)
    plain.build((None, 2))
    assert not is_sharded_variable(plain.kernel)
    shardimpl.uninstall()
    assert plain(torch.ones(1, 2)).shape == (1, 3)


def test_unsupported_keras_versions_are_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.14.0")
    with pytest.raises(RuntimeError, match="supports keras 3.15.x and keras-nightly 3.16.dev; found keras 3.14.0"):
        shardimpl.install()
    assert not shardimpl.is_installed()


def test_a_moved_private_keras_name_fails_loudly(monkeypatch):
    from keras.src.backend.torch import trainer

    monkeypatch.delattr(trainer, compat.torch_trainer_class().__name__)
    with pytest.raises(RuntimeError, match="cannot find Keras' torch trainer class"):
        compat.torch_trainer_class()
