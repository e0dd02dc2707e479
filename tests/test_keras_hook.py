"""The Keras hook in one process: install/uninstall, stock behaviour without a distribution."""

from __future__ import annotations

import keras
import pytest
import torch
from torch.distributed.tensor import DTensor

import shardimpl
from shardimpl import keras_hook


def test_install_is_idempotent_and_uninstall_restores_stock_keras():
    core = keras_hook.torch_core()
    stock = core.Variable.__dict__.get("_initialize")
    with shardimpl.installed():
        shardimpl.install()
        assert keras_hook.is_installed()
        assert core.Variable.__dict__.get("_initialize") is not stock
        assert keras.distribution.list_devices() == ["cpu:0"]
    assert not keras_hook.is_installed()
    assert core.Variable.__dict__.get("_initialize") is stock
    from keras.src.distribution import distribution_lib

    assert distribution_lib.distribution_lib is not shardimpl.keras_backend


def test_without_a_distribution_variables_stay_plain_parameters():
    with shardimpl.installed():
        keras.distribution.set_distribution(None)
        layer = keras.layers.Dense(4)
        layer.build((None, 3))
        assert not isinstance(layer.kernel.value, DTensor)
        assert isinstance(layer.kernel.value, torch.nn.Parameter)


def test_a_model_parallel_layout_is_no_longer_ignored():
    with shardimpl.installed():
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((len(devices),), ["model"], devices)
        lm = keras.distribution.LayoutMap(mesh)
        lm[".*kernel"] = (None, "model")
        keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=lm))
        try:
            layer = keras.layers.Dense(6)
            layer.build((None, 5))
            assert isinstance(layer.kernel.value, DTensor)
            assert str(layer.kernel.value.placements) == "(Shard(dim=1),)"
            assert layer.kernel.numpy().shape == (5, 6)
            assert isinstance(layer.bias.value, DTensor)  # unmatched: replicated
        finally:
            keras.distribution.set_distribution(None)


def test_unsupported_keras_versions_are_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.14.0")
    with pytest.raises(RuntimeError, match="supports keras 3.15.x and keras-nightly 3.16.dev; found keras 3.14.0"):
        shardimpl.install()
    assert not keras_hook.is_installed()
