"""Rank-side checks of `shardimpl.local_views` against DTensor's own to_local / from_local."""

from __future__ import annotations


def _same(a, b) -> bool:
    """Equal layouts, global shapes, strides and local values."""
    return (tuple(a.placements) == tuple(b.placements) and a.shape == b.shape and a.stride() == b.stride()
            and bool((a.to_local() == b.to_local()).all()))


def views_match_dtensor():
    """For to_local (default, given, Partial-forward and transposed-gradient cases) and from_local
    (same and other gradient layouts): gradients equal DTensor's own, as layouts and values."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from shardimpl import local_views

    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    out = {}

    def grad_of(fn, placements):
        x = distribute_tensor(full, mesh, placements).requires_grad_()
        fn(x).backward()
        return x.grad

    to_local_cases = {
        "default": ([Shard(1)], None, lambda t: (t * t).sum()),
        "given": ([Shard(0)], [Partial()], lambda t: (3 * t).sum()),
        # the local gradient reaches to_local's backward transposed (not contiguous)
        "transposed": ([Shard(1)], [Shard(1)], lambda t: (t.t() * torch.arange(24.0).reshape(4, 6)).sum()),
    }
    strided = {"calls": 0}
    own_rule = local_views.compute_global_tensor_info

    def counting(*args):
        strided["calls"] += 1
        return own_rule(*args)

    local_views.compute_global_tensor_info = counting
    for name, (placements, grads, loss) in to_local_cases.items():
        theirs = grad_of(lambda x: loss(x.to_local(grad_placements=grads)), placements)
        # of a parameter (in a train step: its local leaf where the layout allows) and of a computed DTensor
        with local_views.parameter_leaves():
            ours = grad_of(lambda x: loss(local_views.to_local(x, grads)), placements)
        computed = grad_of(lambda x: loss(local_views.to_local(x * 1, grads)), placements)
        out[f"to_local/{name}"] = _same(ours, theirs) and _same(computed, theirs)
    local_views.compute_global_tensor_info = own_rule
    out["transposed_gradients_seen"] = strided["calls"]
    out.update(_parameter_leaf_cases(mesh, full))

    local = torch.arange(24, dtype=torch.float32).reshape(6, 4).requires_grad_()
    for name, (placements, loss) in {"same": ([Shard(1)], lambda d: (d * 2).sum()),
                                     "other": ([Shard(1)], lambda d: d.redistribute(mesh, [Replicate()]).sum())}.items():
        grads = []
        for make in (lambda t: local_views.from_local(t, mesh, placements, (6, 8)),
                     lambda t: DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size((6, 8)),
                                                  stride=(8, 1))):
            leaf = local.detach().clone().requires_grad_()
            d = make(leaf)
            loss(d).backward()
            grads.append(leaf.grad)
        out[f"from_local/{name}"] = bool(torch.equal(grads[0], grads[1])) and _same(
            local_views.from_local(local.detach(), mesh, placements, (6, 8)),
            DTensor.from_local(local.detach(), mesh, placements, run_check=False, shape=torch.Size((6, 8)), stride=(8, 1)))
    partial = local_views.from_local(local.detach(), mesh, [Partial()], (6, 4))
    out["partial_forward_sums"] = bool(torch.equal(partial.full_tensor(), local.detach() * 2))
    try:
        local_views.from_local(local.detach(), mesh, [Shard(0)])
        out["missing_shape_error"] = None
    except ValueError as e:
        out["missing_shape_error"] = str(e)
    return out


def _parameter_leaf_cases(mesh, full):
    """A trainable DTensor's local uses go through one plain leaf per parameter: its gradient lands
    in the parameter's ``grad`` in the parameter's layout, summed with DTensor uses of the same
    parameter and across backward calls, and a replaced local tensor gets a new leaf."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    from shardimpl import local_views

    p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))
    # outside parameter_leaves() (direct calls, users' own steps): a _ToLocal node, which
    # torch.autograd.grad with respect to the parameter sees
    outside = local_views.to_local(p)
    (grad,) = torch.autograd.grad((outside * 2).sum(), [p])
    out = {"outside_autograd_grad_sees_it": not outside.is_leaf and tuple(grad.placements) == (Shard(1),)
           and bool(torch.equal(grad.full_tensor(), torch.full_like(full, 2.0)))}
    with local_views.parameter_leaves():
        out.update(_inside_parameter_leaves(p, full))
    return out


def _inside_parameter_leaves(p, full):
    import torch
    from torch.distributed.tensor import Shard

    from shardimpl import local_views

    leaf = local_views.to_local(p)
    out = {"one_leaf_per_parameter": leaf is local_views.to_local(p) and leaf.is_leaf
           and leaf.data_ptr() == p._local_tensor.data_ptr()}
    (local_views.to_local(p) * 2).sum().backward()
    out["leaf_gradient_in_parameter_layout"] = (
        leaf.grad is None and tuple(p.grad.placements) == (Shard(1),)
        and bool(torch.equal(p.grad.full_tensor(), torch.full_like(full, 2.0))))
    ((local_views.to_local(p) * 3).sum() + (p * 5).sum().full_tensor()).backward()  # local and DTensor uses
    out["leaf_and_dtensor_uses_accumulate"] = bool(torch.equal(p.grad.full_tensor(), torch.full_like(full, 10.0)))
    with torch.no_grad():
        p._local_tensor = p._local_tensor.clone()
    out["replaced_local_tensor_new_leaf"] = local_views.to_local(p) is not leaf
    with torch.no_grad():
        p.mul_(0)
    out["leaf_sees_in_place_updates"] = bool(local_views.to_local(p).abs().sum() == 0)
    return out


def sum_partial_matches_dtensor():
    """`local_views.sum_partial` against DTensor's redistribute (values, layouts, gradients), its
    no-op on an unsummed DTensor, and `to_local`'s backward taking a DTensor gradient (a local
    tensor multiplied by a replicated DTensor, as a LossScaleOptimizer's scale does)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from shardimpl import local_views

    mesh = init_device_mesh("cpu", (2,))
    rank = torch.distributed.get_rank()
    out = {}
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    replicated_weight = distribute_tensor(weight, mesh, [Replicate()])
    grads, values = [], []
    for reduce in (local_views.sum_partial, lambda d: d.redistribute(mesh, [Replicate()])):
        local = (torch.arange(12, dtype=torch.float32).reshape(3, 4) + 10 * rank).requires_grad_()
        partial = DTensor.from_local(local, mesh, [Partial()], run_check=False)
        summed = reduce(partial)
        (summed * replicated_weight).sum().backward()
        values.append(summed.detach())
        grads.append(local.grad)
    out["values"] = _same(values[0], values[1])
    out["gradients"] = bool(torch.equal(grads[0], grads[1]))
    split = distribute_tensor(weight, mesh, [Shard(0)])
    out["unsummed_is_itself"] = local_views.sum_partial(split) is split

    scale = distribute_tensor(torch.tensor(3.0), mesh, [Replicate()])
    x = distribute_tensor(weight, mesh, [Replicate()]).requires_grad_()
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        (local_views.to_local(x) * weight * scale).sum().backward()
    out["dtensor_gradient"] = (tuple(x.grad.placements) == (Replicate(),)
                               and bool(torch.equal(x.grad.to_local(), 3 * weight)))
    return out
