"""shardimpl's torch `distribution_lib` against the behaviours Keras' own backend tests expect,
in one process (a one-device world)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

import shardimpl
from shardimpl.keras import backend


@pytest.fixture(autouse=True)
def installed():
    with shardimpl.installed():
        yield
        keras.distribution.set_distribution(None)


def _mesh(shape=(1,), names=("model",)):
    return keras.distribution.DeviceMesh(shape, list(names), keras.distribution.list_devices())


def test_device_and_process_counts_follow_world_size_before_the_process_group_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert backend.num_processes() == 4
    assert backend.process_id() == 2
    assert backend.list_devices("cpu") == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert backend.get_device_count("cpu") == 4
    assert keras.distribution.list_devices("cpu") == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]


def test_without_world_size_one_process_one_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert backend.num_processes() == 1 and backend.process_id() == 0
    assert backend.list_devices("cpu") == ["cpu:0"]


def test_no_gpu_devices_are_listed_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert backend.list_devices("gpu") == [] and backend.get_device_count("gpu") == 0


def test_to_backend_device_names_cpu_and_refuses_gpus_without_cuda():
    assert backend._to_backend_device("cpu:0") == torch.device("cpu")
    assert backend._to_backend_device(torch.device("cpu")) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="names a GPU but this torch sees no CUDA device"):
            backend._to_backend_device("gpu:0")
    with pytest.raises(ValueError, match="Unknown device 'tpu:0'"):
        backend._to_backend_device("tpu:0")


def test_layout_none_passes_tensors_and_variables_through():
    x = torch.arange(6.0).reshape(2, 3)
    assert backend.distribute_tensor(x, None) is x
    assert backend.distribute_variable(x, None) is x
    assert backend.distribute_data_input(x, None) is x


def test_distribute_data_input_needs_no_batch_dim_name():
    layout = keras.distribution.TensorLayout(("model", None), _mesh())
    out = backend.distribute_data_input(np.ones((4, 3), "float32"), layout)
    assert isinstance(out, DTensor) and tuple(out.shape) == (4, 3)


@pytest.mark.parametrize("fn", ["distribute_variable", "distribute_tensor"])
def test_a_keras_variable_and_a_numpy_array_are_accepted(fn):
    v = keras.Variable(np.arange(6, dtype="float32").reshape(2, 3), name="v")
    layout = keras.distribution.TensorLayout((None, "model"), _mesh())
    for value in (v, np.arange(6, dtype="float32").reshape(2, 3)):
        out = getattr(backend, fn)(value, layout)
        assert isinstance(out, DTensor)
        np.testing.assert_array_equal(out.full_tensor().detach().numpy(), np.arange(6, dtype="float32").reshape(2, 3))


def test_a_dtensor_already_in_the_layout_is_returned_as_is():
    layout = keras.distribution.TensorLayout((None, "model"), _mesh())
    first = backend.distribute_tensor(torch.ones(2, 3), layout)
    assert backend.distribute_tensor(first, layout) is first
    assert backend.distribute_variable(first, layout) is first


def test_distribute_tensor_is_differentiable_and_maps_structures():
    layout = keras.distribution.TensorLayout((None, "model"), _mesh())
    x = torch.ones(2, 3, requires_grad=True)
    out = backend.distribute_tensor({"a": x, "b": [x]}, layout)
    assert isinstance(out["a"], DTensor) and isinstance(out["b"][0], DTensor)
    out["a"].full_tensor().sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 3))


def test_backend_mesh_and_layout_drop_size_one_axes():
    mesh = _mesh((1, 1), ("batch", "model"))
    torch_mesh = backend._to_backend_mesh(mesh)
    assert torch_mesh.mesh_dim_names == ("batch",)
    layout = backend._to_backend_layout(keras.distribution.TensorLayout(("batch", "model"), mesh))
    assert len(layout.placements) == 1  # one placement per kept axis
    assert backend._to_backend_layout(None) is None
