"""What a step's context puts in place: saved-tensor hooks only where something may be gathered."""

from __future__ import annotations

import torch

from shardimpl.fsdp import local_saves
from shardimpl.keras.context import is_within, step_context


def _top_hooks():
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def test_a_step_without_a_data_axis_saves_tensors_with_no_hooks():
    with step_context(regather=False):
        assert is_within()
        assert _top_hooks() is None
        with local_saves():
            assert _top_hooks() is None
    assert not is_within()


def test_a_step_that_may_gather_saves_through_regather_hooks_and_local_ops_bypass_them():
    with step_context(regather=True):
        top = _top_hooks()
        assert top is not None and getattr(top[0], "_shardimpl_regather", False)
        with local_saves():
            inner = _top_hooks()
            assert inner is not None and not getattr(inner[0], "_shardimpl_regather", False)
        assert _top_hooks()[0] is top[0]
    assert _top_hooks() is None


def test_a_direct_call_packs_other_saved_tensors_even_without_a_data_axis():
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    x = torch.randn(3, requires_grad=True)
    with step_context(pack, regather=False):
        y = (x * x).sum()
    y.backward()
    assert packed  # mul saved its operands through the hooks
    torch.testing.assert_close(x.grad, 2 * x.detach())
