"""Stopping cleanly: SIGINT (Ctrl-C) exits 130 and SIGTERM 143, with one line and no process left.

The signal handler kills every process this one started (ranks, the forkserver, the resource
tracker, a peers subprocess) before raising `Stopped` in the main thread; the command line
catches it, says one line and leaves with ``os._exit`` (multiprocessing's exit handlers would
wait on the killed children). The ranks' forkserver starts with SIGINT ignored, which its
ranks inherit: Ctrl-C in a terminal reaches the whole process group, and only the main process
should answer it.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["Stopped", "install_signal_handlers", "exit_stopped", "start_forkserver", "kill_descendants"]


class Stopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM, after every child process was killed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_stopping = False


def kill_descendants() -> None:
    """SIGKILL every process this one started, by pid: ranks, the forkserver, the resource
    tracker, a peers subprocess and theirs."""
    import psutil

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in kids:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=3)


def _on_signal(signum, frame):
    global _stopping
    if _stopping:
        return
    _stopping = True
    kill_descendants()  # first: ranks must not outlive us, whatever the main thread was doing
    raise Stopped(signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # background jobs keep ignoring it
        signal.signal(signal.SIGINT, _on_signal)


def exit_stopped(signum, line) -> None:
    """Kill what is left, write ``line`` (with the signal's name) to stderr, exit 128 + signum:
    130 for SIGINT, 143 for SIGTERM."""
    import multiprocessing.process
    import shutil

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    kill_descendants()
    tempdir = multiprocessing.process.current_process()._config.get("tempdir")
    if tempdir:
        shutil.rmtree(tempdir, ignore_errors=True)  # the forkserver's socket folder
    try:
        sys.stdout.flush()
    except Exception:
        pass
    sys.stderr.write(line.format(signal=signal.Signals(signum).name) + "\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # skip atexit: multiprocessing's would wait on the killed children


def start_forkserver() -> None:
    """Start the ranks' forkserver with SIGINT ignored (ranks inherit it): Ctrl-C in a terminal
    reaches the whole process group, and only this process should answer it."""
    from multiprocessing import forkserver

    from shardimpl import launch

    if launch.in_launched_world():
        return
    launch.process_context()  # the preload list
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
