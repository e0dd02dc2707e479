"""Several nodes without torchrun: SLURM's variables (read by hand and in a simulated job step),
the timeout that bounds every wait and names the absent ranks, Keras' initialize before install."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from shardimpl import launch, launchers, rendezvous

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SLURM_STEP = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "2",
              "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08,11]",
              "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


def test_slurm_host_lists_expand_as_slurm_writes_them():
    assert launchers.expand_hostlist("gpu[01-02,07],cpu-a[1-2]-ib,solo") == [
        "gpu01", "gpu02", "gpu07", "cpu-a1-ib", "cpu-a2-ib", "solo"]
    assert launchers.expand_hostlist("r[1-2]n[08-10]") == ["r1n08", "r1n09", "r1n10", "r2n08", "r2n09", "r2n10"]
    assert launchers.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match="balance its brackets"):
        launchers.expand_hostlist("gpu[01-02")


def test_a_slurm_step_is_read_from_its_variables_alone():
    found = launchers.detect(SLURM_STEP)
    assert found == launchers.Launch("slurm", 3, 4, 1, 2, "gpu07", launchers.slurm_port(4242, 2),
                                     ("gpu07", "gpu08"), 1)
    assert 20000 <= found.master_port < 30000
    given = launchers.detect({**SLURM_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (given.master_addr, given.master_port) == ("head", 29400)


def test_the_launcher_is_torchrun_then_a_slurm_step_then_the_variables_by_hand():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    assert launchers.detect({**SLURM_STEP, **torchrun}).launcher == "torchrun"  # srun torchrun ...
    assert launchers.detect({**SLURM_STEP, "RANK": "0", "WORLD_SIZE": "9"}).launcher == "slurm"
    assert launchers.detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}).launcher == "env"
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}  # sbatch's shell, salloc
    assert launchers.detect(batch_script) is None
    with pytest.raises(ValueError, match="SLURM_PROCID must be an integer"):
        launchers.detect({**SLURM_STEP, "SLURM_PROCID": "x"})


def test_launch_run_and_the_harness_take_a_slurm_steps_tasks_as_their_ranks(monkeypatch):
    from bench import __main__ as bench_main

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    assert not launch.in_launched_world() and bench_main._launched_world() is None
    for key, value in SLURM_STEP.items():
        monkeypatch.setenv(key, value)
    assert launch.in_launched_world()
    assert bench_main._launched_world().rank == 3
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: launch.run spawns its own ranks
    assert not launch.in_launched_world()


def test_the_timeout_is_the_argument_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv(rendezvous.TIMEOUT_ENV, raising=False)
    assert rendezvous.timeout_seconds() == rendezvous.DEFAULT_TIMEOUT == 300.0
    monkeypatch.setenv(rendezvous.TIMEOUT_ENV, "42")
    assert rendezvous.timeout_seconds() == 42.0 and rendezvous.timeout_seconds(7) == 7.0
    monkeypatch.setenv(rendezvous.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="SHARDIMPL_TIMEOUT must be a number of seconds"):
        rendezvous.timeout_seconds()
    with pytest.raises(ValueError, match="positive"):
        rendezvous.timeout_seconds(0)


def _python_part(stderr: str) -> str:
    """A failed process's stderr without C++ stack frames (torch prints dozens per exception)."""
    return "\n".join(line for line in stderr.splitlines() if not line.lstrip().startswith("frame #"))[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_initialize_names_the_ranks_that_never_joined():
    with pytest.raises(rendezvous.RanksMissing, match=r"rank\(s\) \[1, 2\] of 3 did not join") as info:
        rendezvous.initialize(timeout=1, address=f"127.0.0.1:{_free_port()}", world_size=3, rank=0)
    assert info.value.missing == [1, 2] and not dist.is_initialized()


def test_initialize_names_rank_0_when_its_rendezvous_never_opens():
    with pytest.raises(rendezvous.RanksMissing, match="rank 0 did not open the rendezvous") as info:
        rendezvous.initialize(timeout=1, address=f"127.0.0.1:{_free_port()}", world_size=2, rank=1)
    assert info.value.missing == [0] and not dist.is_initialized()


def test_initialize_without_a_launcher_or_a_world_says_what_is_missing(monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))
                or k in ("RANK", "WORLD_SIZE")]:
        monkeypatch.delenv(key)
    with pytest.raises(ValueError, match=r"Missing: \['address', 'world_size'\]"):
        rendezvous.initialize(timeout=1, world_size=None, rank=0)


def test_keras_distribution_before_install_joins_but_names_install_for_layouts():
    import keras

    import shardimpl

    shardimpl.uninstall()
    from keras.src.distribution import distribution_lib

    assert distribution_lib.distribution_lib.__name__ == "shardimpl.keras.before_install"
    assert keras.distribution.list_devices() == ["cpu:0"]
    mesh = keras.distribution.DeviceMesh((1,), ["model"], ["cpu:0"])
    with pytest.raises(AttributeError, match=r"only after shardimpl.install\(\)"):
        mesh.backend_mesh
    shardimpl.install()
    try:
        assert distribution_lib.distribution_lib.__name__ == "shardimpl.keras.backend"
    finally:
        shardimpl.uninstall()
    assert distribution_lib.distribution_lib.__name__ == "shardimpl.keras.before_install"


def _job_whose_derived_port_is_free(step: int = 3) -> tuple[int, int]:
    """A job id whose SLURM port (no MASTER_PORT set) is free here, so the port derivation runs."""
    import random

    for _ in range(100):
        job = random.randrange(10_000, 10_000_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", launchers.slurm_port(job, step)))
                return job, step
            except OSError:
                continue
    pytest.skip("no free port in the derived range 20000-29999")


@pytest.mark.distributed
def test_a_slurm_step_of_three_tasks_joins_runs_and_names_a_stopped_rank(tmp_path):
    """Three processes with only SLURM_* set (no torchrun): item 3 (rank, size, first host of the
    compressed node list, the port from the job id), item 5 (initialize before install, both
    import orders), and item 4 (rank 2 stopped: the others fail after SHARDIMPL_TIMEOUT=3 s plus a
    roll call, naming it)."""
    job, step = _job_whose_derived_port_is_free()
    port = launchers.slurm_port(job, step)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
    base.update(KERAS_BACKEND="torch", OMP_NUM_THREADS="1", SHARDIMPL_TIMEOUT="3",
                PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                SLURM_NTASKS="3", SLURM_NODEID="0", SLURM_JOB_ID=str(job), SLURM_STEP_ID=str(step),
                SLURM_JOB_NODELIST="localhost,node[2-3]", SLURM_TASKS_PER_NODE="3")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_slurm_world.py"), str(tmp_path)],
                              env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(3)]
    try:
        outs = [p.communicate(timeout=300) for p in procs[:2]]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # rank 2 is stopped: SIGKILL ends it
                p.wait()
    for p, (_, err) in zip(procs[:2], outs):
        assert p.returncode == 0, _python_part(err)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(f"\nstopped rank 2, SHARDIMPL_TIMEOUT=3: ranks 0 and 1 returned after "
          f"{ranks[0]['stopped_seconds']:.2f} s and {ranks[1]['stopped_seconds']:.2f} s")
    for rank, out in enumerate(ranks):
        assert out["environ_before"] == {"RANK": None, "WORLD_SIZE": None, "MASTER_ADDR": None, "MASTER_PORT": None}
        assert out["environ_after"] == {"RANK": str(rank), "WORLD_SIZE": "3", "MASTER_ADDR": "localhost",
                                        "MASTER_PORT": str(port)}
        assert out["devices"] == ["cpu:0", "cpu:1", "cpu:2"]
        assert "shardimpl.install()" in out["before_install_error"]
        values = [row["value"] for row in out["rows"]]
        assert [v["rank"] for v in values] == [0, 1, 2] and {v["world"] for v in values} == {3}
        assert [v["pid"] for v in values] == [p.pid for p in procs]  # the tasks themselves: nothing spawned
        stopped = out["stopped_rows"]
        assert [row["status"] for row in stopped] == ["error", "error", "timeout"]
        for row in stopped[:2]:
            assert "RanksMissing" in row["error"] and "rank(s) [2] did not arrive" in row["error"]
        assert "absent from its roll call" in stopped[2]["error"]


@pytest.mark.distributed
def test_when_the_stopped_rank_serves_the_store_the_error_says_so(tmp_path):
    """Rank 0 serves the rendezvous store outside torchrun: stopped, it cannot answer the roll call
    either; rank 1's agreement point fails after the 2 s timeout naming rank 0 and the store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_stopped_store_world.py"), str(tmp_path)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for r in range(2)]
    try:
        _, err = procs[1].communicate(timeout=180)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[1].returncode == 0, _python_part(err)
    out = json.loads((tmp_path / "rank1.json").read_text())
    print(f"\nrank 0 (serving the store) stopped, timeout 2 s: rank 1 failed after {out['seconds']:.2f} s")
    assert out["error"].startswith("RanksMissing: the test's agreement point: a collective timed out after 2 s")
    assert "rank(s) [0] did not arrive" in out["error"] and "rank 0 serves the rendezvous store" in out["error"]
