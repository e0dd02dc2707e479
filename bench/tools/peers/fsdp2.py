"""The fsdp2 peer: torch's ``fully_shard`` (FSDP2) on the families as plain torch modules.

What a torch user reaches for when a model does not fit one device: the family's plain-torch
module (`bench.tools.peers.torch_families`, the same shapes as the Keras model), built on the
meta device, ``fully_shard`` on each block (the transformer's embedding and LM head are units of
their own too) then on the root over a 1-D DeviceMesh of the N ranks,
then materialized shard by shard (``to_empty`` + ``reset_parameters`` per module, each rank
initializing only its own shards: the recipe of torch's FSDP2 documentation). The ranks are the
harness' own (`shardimpl.launch`: N processes over gloo on CPU, one per GPU on CUDA; a rank that
fails or hangs becomes an error or timeout row within ``--timeout``).

Each rank measures what the harness' ranks measure (`bench.harness.scenarios.measure_rank`),
with the same meters (`shardimpl.meters.PeakMeter`, torch allocator and resident host figures),
after the same warm-up (a 1/64-size model of the family built, sharded and materialized):

* build peak: from entering the meta-device build to the last shard initialized;
* step peak: the run's peak over the build and two train steps (the first makes the optimizer's
  state; the second runs its forward while the first's gradients are alive), as the harness';
* step time: the median of three more steps, after a barrier.

The step is the harness' step in torch: the optimizer the run asks for
(`bench.harness.training.make_optimizer`'s Keras optimizer, its hyperparameters read off it:
AdamW or SGD with momentum), the family's loss on the harness' batch and targets
(`bench.harness.training.train_data`, the whole global batch on every rank as the harness'
one-axis mesh has it), gradients kept until the next step's forward has run (Keras' torch
trainer zeroes them there). ``--precision mixed_bfloat16`` is FSDP2's ``MixedPrecisionPolicy`` (bfloat16
parameters gathered and computed with, float32 gradients reduced); ``bfloat16`` makes the
parameters bfloat16; ``--remat full`` checkpoints each transformer block.

What FSDP2 shards is not what shardimpl shards: FSDP2 keeps 1/N of every parameter, gradient and
optimizer state per rank and all-gathers one unit's parameters whole while that unit runs (the
next one prefetched), so each rank computes the whole model on the whole batch; shardimpl's map
is tensor parallelism (each rank computes with its blocks of the kernels, activations move). Build
peaks compare like for like (both 1/N of the parameters, initialized in place); step peaks hold
different things (FSDP2: the gathered units and the whole activations; shardimpl: its blocks and
split activations); step times compare different parallelisms (docs/peers.md says where).
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from dataclasses import replace

from bench.tools.peers.rows import failed_rows

__all__ = ["NAME", "LAYOUTS", "NOTE", "run", "measure_rank", "build_sharded", "torch_optimizer", "train_step", "batch_for"]

NAME = "fsdp2"
LAYOUTS = "fully_shard per block"  # the rows' "layouts": what is sharded, in place of a LayoutMap
NOTE = ("data parallelism with sharded state (each rank gathers a block's parameters and computes the whole "
        "batch), not tensor parallelism: its build peak compares like for like, its step peak and step time do not")
TIMED_STEPS = 3  # as the harness' `_time_steps`


def _mesh(device: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),),
                            mesh_dim_names=("fsdp",))


def _policy(precision: str):
    """FSDP2's mixed precision for the harness' dtype policy (None: the parameters' own dtype)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "mixed_bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def build_sharded(family: str, param_bytes: int, train, device: str, *, seed: int = 0):
    """The family's plain-torch model, built on the meta device, ``fully_shard`` on each of its
    units (`bench.tools.peers.torch_families`: each block or layer; the transformer's embedding
    and LM head too) then the root, materialized on ``device`` (``to_empty``) and initialized shard by shard
    (``reset_parameters`` of every module, on this rank's shards only; seeded per rank)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from bench.tools.peers.torch_families import build_torch_model

    with torch.device("meta"):
        model = build_torch_model(family, param_bytes, remat=train.remat == "full")
        if train.precision == "bfloat16":
            model = model.to(torch.bfloat16)
    mesh, policy = _mesh(device), _policy(train.precision)
    extra = {"mp_policy": policy} if policy is not None else {}
    for unit in model.units():
        fully_shard(unit, mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    model.to_empty(device=device)
    torch.manual_seed(seed + dist.get_rank())  # each rank's shards draw their own numbers
    with torch.no_grad(), warnings.catch_warnings():
        # On a CPU mesh DTensor has no RNG tracker: each rank draws its own shard, which is the point.
        warnings.filterwarnings("ignore", "DTensor random operators may not have complete support")
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def torch_optimizer(params, train):
    """torch's optimizer equal to the harness' Keras one (`bench.harness.training.make_optimizer`),
    its hyperparameters read off the Keras optimizer so that they are written once."""
    import torch

    from bench.harness.training import make_optimizer

    keras_opt = make_optimizer(train)
    lr = float(keras_opt.learning_rate.value)  # the float32 value Keras steps with
    if train.optimizer == "sgd":  # Keras: m = mu m - lr g, w += m; torch: b = mu b + g, w -= lr b (equal)
        return torch.optim.SGD(params, lr=lr, momentum=keras_opt.momentum, nesterov=keras_opt.nesterov)
    return torch.optim.AdamW(params, lr=lr, betas=(keras_opt.beta_1, keras_opt.beta_2), eps=keras_opt.epsilon,
                             weight_decay=keras_opt.weight_decay, amsgrad=keras_opt.amsgrad)


def train_step(model, optimizer, data, loss_fn) -> float:
    """One step as Keras' torch trainer runs it: forward (beside the last step's gradients), then
    those gradients dropped, the family's loss, backward (FSDP2 reduce-scatters each unit's
    gradients), the optimizer's update of this rank's shards. Returns the loss."""
    x, y = data
    out = model(x)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(out.float(), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _state_bytes(model, optimizer) -> dict:
    """This rank's model state after a step, as `bench.harness.training.model_state_bytes` counts it."""
    params = list(model.parameters())
    weights = _local_bytes(params)
    grads = _local_bytes(p.grad for p in params if p.grad is not None)
    slots = _local_bytes(v for s in optimizer.state.values() for v in s.values()
                         if hasattr(v, "numel") and v.dim() > 0)
    return {"weight_bytes": weights, "grad_bytes": grads, "slot_bytes": slots,
            "model_state_bytes": weights + grads + slots}


def _time_steps(model, optimizer, data, loss_fn, device) -> dict:
    """The median of ``TIMED_STEPS`` steps after a barrier, and steps per second over them
    (the harness' own timing loop)."""
    from bench.harness.scenarios import time_steps

    return time_steps(lambda: train_step(model, optimizer, data, loss_fn), device, TIMED_STEPS)


def batch_for(scenario, device):
    """The harness' (inputs, targets) for ``scenario`` (`bench.harness.training.train_data`) on ``device``."""
    from bench.harness.training import train_data

    x, y = train_data(scenario.family, scenario.param_bytes, scenario.train)
    return x.to(device), y.to(device)


def measure_rank(scenario) -> dict:
    """Runs on every rank: the build (metered), the run's peak over build and two steps (metered),
    three more steps (timed). The keys of `bench.harness.scenarios.measure_rank`'s result, plus
    ``losses``: the two metered steps' losses."""
    import torch

    device = "cpu" if scenario.device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    _warm_up(scenario, device)
    out, model, optimizer, data = _metered_run(scenario, device)
    if scenario.step:
        from bench.tools.peers.torch_families import family_loss

        out.update(_state_bytes(model, optimizer))
        out.update(_time_steps(model, optimizer, data, family_loss(scenario.family), device))
    return out


def _warm_up(scenario, device) -> None:
    """First use of FSDP2, gloo and the initializers on a 1/64-size model, under a meter of its own,
    as the harness' ranks warm up: what the metered build then shows is the model's."""
    import torch.distributed as dist

    from shardimpl.budgets import warm_thread_pools
    from shardimpl.meters import PeakMeter

    gc.collect()
    dist.barrier()
    warm_thread_pools()
    with PeakMeter(device, trace_python=False):
        build_sharded(scenario.family, max(scenario.param_bytes // 64, 1 << 16), scenario.train, device)
    gc.collect()


def _metered_run(scenario, device):
    """(figures, model, optimizer, batch): the build's peak inside the run's, the run being the
    build and two train steps (the first makes the optimizer's state; the second runs its forward
    beside the first's gradients)."""
    from bench.tools.peers.torch_families import family_loss
    from shardimpl.meters import PeakMeter

    out = {"oom": False, "error": None, "gather_seconds": None, "step_peak_bytes": None,
           "step_host_peak_bytes": None, "losses": []}
    optimizer = data = None
    start = time.perf_counter()
    with PeakMeter(device, trace_python=False) as run:
        with PeakMeter(device, trace_python=False) as meter:
            model = build_sharded(scenario.family, scenario.param_bytes, scenario.train, device)
        out["init_seconds"] = time.perf_counter() - start
        out["build_peak_bytes"] = meter.result().device_peak_bytes
        out["build_host_peak_bytes"] = meter.result().host_peak_bytes
        out["local_bytes"] = _local_bytes(model.parameters())
        out["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())  # global shapes
        if scenario.step:
            data = batch_for(scenario, device)
            optimizer = torch_optimizer(model.parameters(), scenario.train)
            out["losses"] = [train_step(model, optimizer, data, family_loss(scenario.family)) for _ in range(2)]
    if scenario.step:
        out["step_peak_bytes"] = run.result().device_peak_bytes
        out["step_host_peak_bytes"] = run.result().host_peak_bytes
    return out, model, optimizer, data


def rows_for(scenario, launched) -> list[dict]:
    """The harness' rows (`bench.harness.scenarios.rows_for`) of one fsdp2 scenario, one per rank
    per phase, with ``layouts`` naming what FSDP2 shards instead of a LayoutMap and ``peer_note``
    saying, in the verdict, which of its figures compare with shardimpl's."""
    from bench.harness.scenarios import rows_for as harness_rows

    return [{**r, "layouts": LAYOUTS, "peer_note": NOTE} for r in harness_rows(scenario, launched)]


def _unsupported(scenario) -> str | None:
    """Why ``scenario`` cannot run as fsdp2 (a family with no plain-torch module), or None."""
    from bench.tools.peers.torch_families import TORCH_FAMILIES

    if scenario.family not in TORCH_FAMILIES:
        return (f"fsdp2: the {scenario.family} family is a keras-hub backbone, with no plain-torch module here "
                f"(fsdp2 runs {', '.join(TORCH_FAMILIES)})")
    if scenario.family == "mlp" and scenario.train.remat == "full":
        return "fsdp2: --remat full is per Keras layer for the mlp, which the plain-torch mlp does not checkpoint"
    return None


def _run_scenarios(scenarios, timeout, log) -> list[dict]:
    """Each scenario on its ranks, one world per N reused across that N's scenarios (as the
    harness does); a world whose rank failed is closed and the next scenario gets a fresh one."""
    from shardimpl import launch

    rows, world = [], None
    try:
        for i, s in enumerate(scenarios, 1):
            why = _unsupported(s)
            if why:
                new = failed_rows([s], why, layouts=LAYOUTS, peer_note=NOTE)
            else:
                if world is None or world.closed or world.nprocs != s.ranks:
                    if world is not None:
                        world.close()
                    world = launch.World(s.ranks, device=s.device, timeout=timeout)
                new = rows_for(s, world.run(measure_rank, s, timeout=timeout))
            _say(log, i, len(scenarios), s, new)
            rows += new
    finally:
        if world is not None:
            world.close()
    return rows


def _say(log, i, total, s, rows) -> None:
    statuses = sorted({r["status"] for r in rows})
    errors = sorted({r["error"].strip().splitlines()[-1][:200] for r in rows if r.get("error")})
    print(f"peers: fsdp2 [{i}/{total}] {s.family} {s.param_bytes >> 20} MiB N={s.ranks} {'/'.join(statuses)}"
          + "".join(f"\n    {e}" for e in errors), file=log, flush=True)


def run(args, scenarios, *, log=sys.stderr):
    """fsdp2's rows for ``scenarios`` (unbudgeted; a budget is the harness' alone), on rank
    processes of this environment; a family it cannot express is error rows that say so."""
    import torch

    ordered = sorted((replace(s, budget_bytes=None) for s in scenarios), key=lambda s: s.ranks)
    rows = _run_scenarios(ordered, args.timeout, log)
    return rows, {"torch": torch.__version__,
                  "units": "fully_shard on each block (transformer: and the embedding, the LM head), then the root"}
