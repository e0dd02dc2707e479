"""Under torchrun: Keras' initialize() joins torchrun's world, and launch.run uses its ranks;
two torchrun "nodes" on one machine (--nnodes=2, static and c10d rendezvous on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.distributed
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env(tmp_path):
    """torchrun's agent writes a log folder under TMPDIR and keeps it: keep it in tmp_path."""
    return {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
            "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _python_part(stderr: str) -> str:
    """A failed process's stderr without C++ stack frames (torch prints dozens per exception)."""
    return "\n".join(line for line in stderr.splitlines() if not line.lstrip().startswith("frame #"))[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(commands, *, env, cwds, timeout):
    """Start one torchrun agent per command (its own session), wait for all; kill all on timeout."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for cmd, cwd in zip(commands, cwds)]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def _mount_namespaces_work(tmp_path) -> list[str] | None:
    """The `unshare` prefix that gives a command its own mount namespace with a bind mount
    (as root: --mount; otherwise with a user namespace), or None where neither works (or
    SHARDIMPL_TEST_NO_NAMESPACES=1 asks for the fallback)."""
    if os.environ.get("SHARDIMPL_TEST_NO_NAMESPACES") == "1":
        return None
    a, b = tmp_path / "ns-a", tmp_path / "ns-b"
    a.mkdir()
    b.mkdir()
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        try:
            done = subprocess.run(prefix + ["sh", "-c", 'mount --bind "$0" "$1"', str(a), str(b)],
                                  capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return None


def test_keras_initialize_and_launcher_use_torchruns_ranks(tmp_path):
    out = tmp_path / "out.json"
    cmd = TORCHRUN + ["--standalone", "--nproc-per-node=2", os.path.join(HERE, "_torchrun_script.py"), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=_env(tmp_path))
    assert done.returncode == 0, _python_part(done.stderr)
    data = json.loads(out.read_text())
    assert data["devices"] == ["cpu:0", "cpu:1"]
    assert [(r["rank"], r["status"], r["value"]) for r in data["rows"]] == [(0, "ok", 0), (1, "ok", 1)]
    assert data["local"] == [8, 8]  # the (8, 16) kernel split over torchrun's two ranks


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """One world of two torchrun nodes (static rendezvous), each node with its own folder at the
    same path: a mount namespace per node where possible, else a working directory per node and
    a relative path (the same string, a different folder per node)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    shared, results, local = tmp / "shared", tmp / "results", tmp / "local"
    nodes = [tmp / "node0", tmp / "node1"]
    for folder in (shared, results, local, *nodes):
        folder.mkdir()
    prefix = _mount_namespaces_work(tmp)
    port = _free_port()
    commands, cwds = [], []
    for n, node in enumerate(nodes):
        script = [os.path.join(HERE, "_two_nodes_script.py"), str(shared),
                  str(local) if prefix else "local", str(results)]
        torchrun = TORCHRUN + ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={n}",
                               "--master-addr=127.0.0.1", f"--master-port={port}"] + script
        if prefix:
            commands.append(prefix + ["sh", "-c", 'mount --bind "$0" "$1" && shift 1 && exec "$@"',
                                      str(node), str(local)] + torchrun)
            cwds.append(ROOT)
        else:
            commands.append(torchrun)
            cwds.append(str(node))
    begin = time.monotonic()
    done = _run_nodes(commands, env=_env(tmp), cwds=cwds, timeout=420)
    seconds = time.monotonic() - begin
    for rc, _, err in done:
        assert rc == 0, _python_part(err)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    how = "a mount namespace per node" if prefix else "a working directory per node"
    print(f"\ntwo torchrun nodes ({how}): {seconds:.1f} s; launch.run after rank 1 raised returned in "
          f"{ranks[0]['failed_seconds']:.2f} s (rank 0), {ranks[1]['failed_seconds']:.2f} s (rank 1)")
    return {"ranks": ranks, "nodes": nodes if prefix else [node / "local" for node in nodes], "how": how}


def test_two_nodes_are_two_ranks_of_one_world(two_nodes):
    assert [(r["rank"], r["group_rank"], r["world"]) for r in two_nodes["ranks"]] == [(0, 0, 2), (1, 1, 2)]


def test_save_sharded_on_a_shared_folder_holds_every_ranks_shards(two_nodes):
    for r in two_nodes["ranks"]:
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(r["shared_saved"])


def test_save_sharded_on_node_local_disks_fails_on_every_rank_and_keeps_the_previous(two_nodes):
    rank0, rank1 = two_nodes["ranks"]
    for r in (rank0, rank1):
        assert r["local_error"] and "shared by all nodes" in r["local_error"], r["local_error"]
        assert "node-local disks" in r["local_error"]
        assert r["local_kept_previous"]
    assert "__1_0.distcp" in rank0["local_error"] and "rank(s) [1]" in rank0["local_error"]
    assert "__0_0.distcp" in rank1["local_error"] and ".metadata" in rank1["local_error"]
    for node in two_nodes["nodes"]:  # each node's own folder: the previous version and its link, nothing else
        names = sorted(os.listdir(node))
        assert len(names) == 2 and "ckpt" in names and names[0].startswith(".ckpt.v-"), names


def test_a_rank_that_raises_in_launch_run_reaches_every_rank(two_nodes):
    for r in two_nodes["ranks"]:
        rows = r["failed_rows"]
        assert [row["status"] for row in rows] == ["error", "error"]
        assert "rank 1 broke on purpose" in rows[1]["error"]
        # rank 0 waited in the all-reduce: released by the closed connection, not by a timeout
        assert "stopped after rank 1 failed first" in rows[0]["error"]
        assert "Connection closed by peer" in rows[0]["error"] and "Timed out" not in rows[0]["error"]
        assert r["group_after_failure"] is False


def test_after_a_failed_call_the_next_launch_run_joins_a_fresh_group(two_nodes):
    for r in two_nodes["ranks"]:
        assert [(row["status"], row["value"]) for row in r["again_rows"]] == [("ok", 3.0), ("ok", 3.0)]


def test_the_scaling_harness_runs_on_two_torchrun_nodes_and_records_the_world(tmp_path):
    out = tmp_path / "bench"
    port = _free_port()
    commands = [TORCHRUN + ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench-two-nodes", "-m", "bench",
                            "--families", "mlp", "--sizes", "32", "--no-step", "--budget", "24",
                            "--ranks", "1,2,4", "--out", str(out)] for _ in range(2)]
    done = _run_nodes(commands, env=_env(tmp_path), cwds=[ROOT, ROOT], timeout=300)
    for rc, _, err in done:
        assert rc == 0, _python_part(err)
    results = json.loads((out / "results.json").read_text())
    rows, world = results["rows"], results["meta"]["world"]
    assert {r["ranks"] for r in rows} == {2} and {r["rank"] for r in rows} == {0, 1}
    budgeted = {(r["mode"], r["rank"]): r for r in rows if r["budget_bytes"]}
    assert budgeted[("unsharded", 0)]["oom"] and budgeted[("unsharded", 1)]["oom"]
    assert budgeted[("sharded", 0)]["status"] == "ok" and budgeted[("sharded", 0)]["peak_bytes"] < 24 << 20
    assert world["launcher"] == "torchrun" and world["world_size"] == 2 and world["nodes"] == 2
    assert sorted(world["node_of_rank"]) == [0, 1] and len(world["hosts"]) == 2
    assert world["ranks_per_host"] == {socket.gethostname(): 2}
    said = "".join(err for _, _, err in done)
    assert "the ranks are the launcher's: N = 2; --ranks 1,2,4 is ignored" in said
