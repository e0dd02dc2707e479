"""Benchmark scenarios: (family, size, N, mode), each measured on N launched ranks.

Modes:
* ``unsharded``: stock Keras, no distribution: every rank builds the whole model.
* ``sharded``: `shardimpl.install()` + `ModelParallel` with the family's LayoutMap.
* ``naive``: as sharded, but each variable is built whole on the host first
  (`bench.harness.naive.naive_distribute_variable`).
* ``keras-native``: keras-nightly's own torch ModelParallel (no shardimpl hook);
  needs keras-nightly in the environment (`python -m bench peers` makes one).

Each rank measures, with `PeakMeter`, the peak of live bytes while building
the model (under the per-rank budget when one is given: an allocator error
there is recorded as ``oom``), then, with the scenario's `TrainConfig`
(`bench.harness.training`: optimizer, dtype policy, remat, sequence, batch), the
peak over the whole run: build and two of Keras' own train steps (the first
creates the optimizer's slots; the second runs its forward while the first's
gradients are still alive, as every later step does), then times three more
steps, then for sharded models the time to gather every variable to rank 0's
host memory. Each phase's row carries both of the meter's
figures: ``peak_bytes`` (torch's allocator: CPU storages from aten ops, or the
CUDA caching allocator) and ``host_peak_bytes`` (everything the rank's process
took, torch or not: its resident high-water mark). Before
the metered build each rank builds a 1/64-size model of the same family under
a meter, so that first-use costs (imports, code pages, gloo's buffers, the
meter's own tables) stay out of the figures. The meters here read the host
figure's resident view only (``trace_python=False``): tracing Python's
allocations makes a Python-heavy build 1.5 to 3.6 times slower (measured on 1 MiB
models), which ``init_seconds`` would include. Memory that is
allocated and never written (an untouched ``np.empty``) is therefore not in
these rows' host figure; the gate (`bench.gates.memory`) reads both views.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("KERAS_BACKEND", "torch")

from bench.harness.training import DEFAULT, TrainConfig  # noqa: E402

__all__ = ["Scenario", "MODES", "measure_rank", "run_scenario", "rows_for"]

MODES = ("unsharded", "sharded", "naive", "keras-native")


@dataclass(frozen=True)
class Scenario:
    family: str
    param_bytes: int  # the size knob: bytes of float32 parameters (target); rows carry the exact size
    ranks: int
    mode: str
    device: str = "cpu"
    budget_bytes: int | None = None
    step: bool = True
    mesh: tuple | None = None  # (B, M): a ("batch", "model") mesh; None: the family's 1-D mesh
    train: TrainConfig = DEFAULT  # the train step measured (and the model's batch, sequence, policy)
    layouts: str = "family"  # "family" or "width-split" (the previous maps, `bench.harness.peer_layouts`)


def _model_mesh(device: str, family: str = "mlp", mesh=None):
    import keras

    from bench.harness.families import model_mesh

    devices = keras.distribution.list_devices("gpu" if device == "cuda" else "cpu")
    return model_mesh(family, devices, mesh)


def _distribution(scenario: Scenario):
    import keras

    import shardimpl
    from bench.harness.peer_layouts import peer_layout_map

    if scenario.mode == "unsharded":
        keras.distribution.set_distribution(None)  # stock Keras (a torchrun rank runs many scenarios)
        return None
    if scenario.mode == "keras-native":
        if ".dev" not in keras.__version__:
            raise RuntimeError(
                f"mode keras-native needs keras-nightly; this environment has keras {keras.__version__}. "
                "Run `python -m bench peers`, which measures it in a keras-nightly virtualenv."
            )
    else:
        shardimpl.install()
    if scenario.mode == "naive":
        from bench.harness.naive import use_naive_creation

        use_naive_creation()
    mesh = _model_mesh(scenario.device, scenario.family, scenario.mesh)
    lm = peer_layout_map(scenario.layouts, scenario.family, mesh, scenario.param_bytes, batch=scenario.train.batch,
                         seq=scenario.train.seq)
    dist_ = keras.distribution.ModelParallel(layout_map=lm)
    keras.distribution.set_distribution(dist_)
    return dist_


def _local_bytes(model) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the full model) over all weights."""
    local = full = 0
    for v in model.weights:
        t = v.value
        itemsize = t.element_size()
        full += t.numel() * itemsize
        local += (t.to_local() if hasattr(t, "to_local") else t).numel() * itemsize
    return local, full


TIMED_STEPS = 3


def _time_steps(model, data, device, steps: int = TIMED_STEPS) -> dict:
    """Speed, unmetered: the median of ``steps`` back-to-back train steps, and steps/s over them.

    Runs after the metered step, so the meter's bookkeeping is not timed. Stock Keras
    (mode "unsharded") runs the same step on the same number of ranks in the same run,
    which makes the two comparable: a speed regression shows next to the memory one.
    """
    from bench.harness.training import train_step

    return time_steps(lambda: train_step(model, data, device), device, steps)


def time_steps(step, device: str, steps: int = TIMED_STEPS) -> dict:
    """``step()`` timed ``steps`` times back to back after a barrier (device-synchronized on
    CUDA): the median seconds and steps/s over them. Shared by the harness and the fsdp2 peer."""
    import statistics

    import torch
    import torch.distributed as dist

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dist.barrier()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"step_seconds": statistics.median(times), "steps_per_second": steps / sum(times)}


def _gather_all(model) -> float:
    import torch.distributed as dist

    import shardimpl

    dist.barrier()
    start = time.perf_counter()
    for v in model.weights:
        shardimpl.all_gather_variable(v.value, dst=0, name=v.path)
    dist.barrier()
    return time.perf_counter() - start


def measure_rank(scenario: Scenario) -> dict:
    """Runs on every rank: build (metered, under budget), the run's peak over build and two
    train steps (metered), three more steps (timed), gather (timed)."""
    import torch
    import torch.distributed as dist

    from bench.harness import training
    from bench.harness.families import build_model
    from shardimpl.budgets import budget, is_oom, warm_thread_pools
    from shardimpl.meters import PeakMeter

    device = "cpu" if scenario.device == "cpu" else f"cuda:{torch.cuda.current_device()}"
    train = scenario.train
    shape = {"batch": train.batch, "seq": train.seq, "remat": train.remat == "full"}
    _distribution(scenario)
    out = {"oom": False, "error": None, "step_peak_bytes": None, "step_host_peak_bytes": None,
           "gather_seconds": None}
    gc.collect()
    dist.barrier()
    warm_thread_pools()  # before the meter: its warm-up tensors are not the model's
    with PeakMeter(device, trace_python=False), training.dtype_policy(train):  # first use of Keras, gloo
        build_model(scenario.family, max(scenario.param_bytes // 64, 1 << 16), **shape)
    gc.collect()
    start = time.perf_counter()
    with PeakMeter(device, trace_python=False) as run, training.dtype_policy(train):
        try:
            with PeakMeter(device, trace_python=False) as meter:
                if scenario.budget_bytes:
                    with budget(scenario.budget_bytes, device=device):
                        model = build_model(scenario.family, scenario.param_bytes, **shape)
                else:
                    model = build_model(scenario.family, scenario.param_bytes, **shape)
        except Exception as exc:  # an allocator error under the budget is the result
            if not is_oom(exc):
                raise
            out.update(oom=True, build_peak_bytes=None, build_host_peak_bytes=None, init_seconds=None,
                       local_bytes=None, model_bytes=None, error=str(exc).splitlines()[0][:200])
            return out
        out["init_seconds"] = time.perf_counter() - start
        out["build_peak_bytes"] = meter.result().device_peak_bytes
        out["build_host_peak_bytes"] = meter.result().host_peak_bytes
        out["local_bytes"], out["model_bytes"] = _local_bytes(model)
        if scenario.step:
            data = training.train_data(scenario.family, scenario.param_bytes, train)
            training.compile_model(model, scenario.family, train)
            training.train_step(model, data, device)  # creates the optimizer's slots
            training.train_step(model, data, device)  # a forward beside the last step's gradients
    if scenario.step:
        out["step_peak_bytes"] = run.result().device_peak_bytes
        out["step_host_peak_bytes"] = run.result().host_peak_bytes
        out.update(training.model_state_bytes(model))
        with training.dtype_policy(train):
            out.update(_time_steps(model, data, device))
    if scenario.mode != "unsharded":
        out["gather_seconds"] = _gather_all(model)
    return out


def run_scenario(scenario: Scenario, *, timeout: float = 300.0):
    """Launch ``scenario`` on its ranks; returns the launcher's rows."""
    from shardimpl import launch

    return launch.run(measure_rank, scenario.ranks, scenario, device=scenario.device, timeout=timeout)


def rows_for(scenario: Scenario, launched) -> list[dict]:
    """results.json rows: one per rank per phase ("build", "step")."""
    from bench.harness.families import mesh_label, param_count
    from bench.harness.training import state_bytes_per_param, variable_itemsize

    rows = []
    for r in launched:
        value = r.value or {}
        oom = r.status == "oom" or bool(value.get("oom"))
        params = param_count(scenario.family, scenario.param_bytes)
        param_bytes = params * variable_itemsize(scenario.train)
        base = {
            "family": scenario.family, "param_bytes": param_bytes, "params": params, "ranks": scenario.ranks,
            "rank": r.rank, "mode": scenario.mode, "device": scenario.device,
            "mesh": mesh_label(scenario.mesh, scenario.ranks), "layouts": scenario.layouts,
            "budget_bytes": scenario.budget_bytes, "status": "oom" if oom else r.status,
            "oom": oom, "error": value.get("error") or (r.error.splitlines()[-1] if r.error else None),
            "init_seconds": value.get("init_seconds"), "gather_seconds": value.get("gather_seconds"),
            "local_bytes": value.get("local_bytes"), **scenario.train.as_row(),
        }
        rows.append({**base, "phase": "build", "peak_bytes": value.get("build_peak_bytes"),
                     "host_peak_bytes": value.get("build_host_peak_bytes"),
                     "ideal_bytes": param_bytes / scenario.ranks})
        if scenario.step:
            # The run's peak (build + steps) against the model state a step keeps: weights,
            # gradients and optimizer slots, 1/N of them per rank at best (activations apart).
            rows.append({**base, "phase": "step", "peak_bytes": value.get("step_peak_bytes"),
                         "host_peak_bytes": value.get("step_host_peak_bytes"),
                         "step_seconds": value.get("step_seconds"),
                         "steps_per_second": value.get("steps_per_second"),
                         "model_state_bytes": value.get("model_state_bytes"),
                         "ideal_bytes": params * state_bytes_per_param(scenario.train) / scenario.ranks})
    return rows


def scenario_dict(s: Scenario) -> dict:
    return asdict(s)
