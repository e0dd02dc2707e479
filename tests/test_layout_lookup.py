"""LayoutMap lookups with the matching key remembered give Keras' own answers, as the map changes;
activation layouts resolved once per layout, axes and shape."""

from __future__ import annotations

import keras
import pytest
from keras.distribution import DeviceMesh, LayoutMap

from shardimpl.keras.layout_lookup import wrap_getitem

_KERAS_GETITEM = LayoutMap.__getitem__.__wrapped__ if hasattr(LayoutMap.__getitem__, "__wrapped__") else LayoutMap.__getitem__
_remembering = wrap_getitem(_KERAS_GETITEM)


def _map():
    lm = LayoutMap(DeviceMesh((1,), ["model"], ["cpu:0"]))
    lm[r".*attn/output"] = (None, None, None)
    lm[r".*mlp_(gate|up)/kernel"] = (None, "model")
    lm["exact/kernel"] = ("model", None)
    return lm


def _axes(layout):
    return None if layout is None else tuple(layout.axes)


def test_answers_equal_keras_for_exact_regex_and_missing_paths_asked_twice():
    lm = _map()
    for path in ["exact/kernel", "block0/block0_attn/output", "block0/block0_mlp_up/kernel",
                 "block0/block0_norm1/output", "block0/block0_attn/output", "block0/block0_norm1/output"]:
        assert _axes(_remembering(lm, path)) == _axes(_KERAS_GETITEM(lm, path)), path


def test_a_key_added_after_a_lookup_is_seen():
    lm = _map()
    assert _remembering(lm, "block1/block1_norm1/output") is None
    lm[r".*norm\d/output"] = (None, "model", None)
    assert _axes(_remembering(lm, "block1/block1_norm1/output")) == (None, "model", None)
    del lm[r".*norm\d/output"]
    assert _remembering(lm, "block1/block1_norm1/output") is None


def test_a_replaced_layout_under_the_same_key_is_returned():
    lm = _map()
    assert _axes(_remembering(lm, "b/attn/output")) == (None, None, None)
    # Keras refuses a duplicate key; its dict may still be written in place (same keys).
    lm._layout_map[r".*attn/output"] = keras.distribution.TensorLayout((None, "model", None), lm.device_mesh)
    assert _axes(_remembering(lm, "b/attn/output")) == (None, "model", None)


def test_a_path_two_keys_match_raises_keras_error_every_time():
    lm = _map()
    lm[r"block0/.*"] = (None,)
    for _ in range(2):
        with pytest.raises(ValueError, match="matches multiple layout"):
            _remembering(lm, "block0/block0_attn/output")


def test_install_puts_it_on_keras_layout_map():
    import shardimpl

    shardimpl.install()
    try:
        assert getattr(keras.distribution.LayoutMap.__getitem__, "__wrapped__", None) is _KERAS_GETITEM
    finally:
        shardimpl.uninstall()
    assert keras.distribution.LayoutMap.__getitem__ is _KERAS_GETITEM


def test_an_activation_layout_is_resolved_once_and_again_when_its_axes_change():
    from shardimpl.keras.backend import _resolved

    layout = keras.distribution.TensorLayout((None, "model"), DeviceMesh((1,), ["model"], ["cpu:0"]))
    first, placements = _resolved(layout, (2, 4))
    again, _ = _resolved(layout, (2, 4))
    assert again is first  # resolved once per layout, axes, mesh and shape
    assert all(p.is_replicate() for p in placements)  # a one-device mesh splits nothing
    layout._axes = ("model", None)
    changed, _ = _resolved(layout, (2, 4))
    assert changed is not first
    other_shape, _ = _resolved(layout, (4, 4))
    assert other_shape is not changed
