"""Releasing ranks stuck in a gloo collective with a rank that failed: close the world's connections.

When one rank's function raises, the others may be inside a collective
waiting for it. gloo (torch 2.13) has no way to interrupt that wait:
``ProcessGroupGloo.abort()`` and ``shutdown()`` leave a pending all-reduce
waiting, and `destroy_process_group` frees the connections only once nothing
references the group (a `DeviceMesh` does); measured, the peers waited until
the failed process exited. What does release them at once is the end of a
connection: gloo then raises "Connection closed by peer" in the waiting
collective (and in every later one), a plain RuntimeError.

`release_connections()` shuts down (``shutdown(SHUT_RDWR)``, on a duplicate of
the descriptor, so gloo still owns and closes its own) this process's TCP
connections that were accepted on the listening sockets the process groups
opened. Every gloo connection between two ranks was accepted by exactly one of
them, so when every live rank releases, every connection between them ends.
`note_listeners_before_groups()` records the listening sockets that existed
before the process group was created (a notebook's, a metrics server's): they
and the rendezvous store's port are never touched.

Linux only (it reads /proc/self/net/tcp*); elsewhere it releases nothing and
the peers fail at the process group's timeout. NCCL communicators are not TCP
connections: nothing is released there either.
"""

from __future__ import annotations

import os
import socket

__all__ = ["release_connections", "note_listeners_before_groups", "tcp_sockets"]

_LISTEN, _ESTABLISHED = "0A", "01"
_before: set[tuple[str, str]] | None = None


def tcp_sockets() -> list[tuple[int, str, str, str]]:
    """This process's TCP sockets as (fd, local, remote, state) with /proc's hex addresses."""
    by_inode = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9:
                by_inode[fields[9]] = (fields[1], fields[2], fields[3])
    out = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in by_inode:
            out.append((int(fd), *by_inode[link[8:-1]]))
    return out


def _listeners() -> set[tuple[str, str]]:
    return {tuple(local.split(":")) for _, local, _, state in tcp_sockets() if state == _LISTEN}


def note_listeners_before_groups() -> None:
    """Remember the listening sockets that exist now, before a process group opens its own."""
    global _before
    _before = _listeners()


def _accepted_on(local: str, listeners: set[tuple[str, str]]) -> bool:
    ip, port = local.split(":")
    return any(port == lport and (ip == lip or set(lip) == {"0"}) for lip, lport in listeners)


def release_connections(*, keep_port: int | None = None) -> int:
    """Shut down the connections this process accepted on its process groups' listeners.

    ``keep_port``: the rendezvous store's port (its connections stay up: the
    ranks exchange their results through it). Returns how many connections
    were shut down. Idempotent; never raises.
    """
    try:
        sockets = tcp_sockets()
        listeners = {tuple(local.split(":")) for _, local, _, state in sockets if state == _LISTEN}
        listeners -= _before or set()
        if keep_port is not None:
            listeners = {(ip, port) for ip, port in listeners if int(port, 16) != int(keep_port)}
        done = 0
        for fd, local, _, state in sockets:
            if state != _ESTABLISHED or not _accepted_on(local, listeners):
                continue
            try:
                dup = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                dup.shutdown(socket.SHUT_RDWR)
                done += 1
            except OSError:
                pass
            finally:
                dup.close()  # closes the duplicate only; gloo still owns fd
        return done
    except Exception:
        return 0
