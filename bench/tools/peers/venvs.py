"""Virtualenvs for peers that cannot share this environment, created on first use, then reused.

keras-nightly (keras-native) and keras 3.15 cannot be installed side by side, and the keras-jax
peer needs JAX, which this project does not. Each peer names a `VenvSpec`; `ensure_venv` makes
the virtualenv when its python is missing (minutes the first time: pip installs from the
configured index), checks what it holds every time, and raises with the failing command's
output otherwise. The caller turns that into error rows: a peer that cannot be installed is a
result, not a crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

__all__ = ["VenvSpec", "ensure_venv", "PROJECT"]

PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@dataclass(frozen=True)
class VenvSpec:
    """What a peer's virtualenv holds.

    installs: pip install argument lists, run in order into a new virtualenv.
    check: Python code run there every time, with ``env``; it must print one line with
        ``expect`` in it (e.g. a version), else the virtualenv is reported as unusable.
    editable: pip install -e this project there (--no-deps); otherwise the peer's runs put the
        project on PYTHONPATH.
    """

    name: str
    installs: tuple[tuple[str, ...], ...]
    check: str
    expect: str
    env: dict = field(default_factory=dict)
    editable: bool = False


def _run(cmd, log, env=None) -> None:
    print("peers: " + " ".join(cmd[-4:]), file=log, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def ensure_venv(path: str, spec: VenvSpec, *, log=sys.stderr) -> str:
    """Create (when its python is missing) or reuse the virtualenv at ``path``; its python."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        print(f"peers: creating the {spec.name} virtualenv {path} (once; reused after)", file=log, flush=True)
        _run([sys.executable, "-m", "venv", path], log)
        for args in spec.installs:
            _run([python, "-m", "pip", "install", "-q", *args], log)
    if spec.editable:
        _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", PROJECT], log)
    check = subprocess.run([python, "-c", spec.check], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **spec.env})
    if check.returncode != 0 or spec.expect not in check.stdout:
        raise RuntimeError(f"{path} is not a usable {spec.name} virtualenv: expected {spec.expect!r} from "
                           f"`{spec.check}`, got {check.stdout.strip()!r} {check.stderr.strip()[-500:]}. "
                           f"Remove the folder and run again to recreate it.")
    return python
