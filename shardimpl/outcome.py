"""One rank's outcome of one call: `RankResult`, and ``fn`` called as a row, whatever happens.

Shared by the launcher that spawns ranks (`shardimpl.launch`) and the one
that runs inside a launcher's world (`shardimpl.launched`): a failure is a
row (``"error"``, ``"oom"``), never an exception, so every rank can report.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["RankResult", "call", "describe", "local_device"]


@dataclass(frozen=True)
class RankResult:
    """One rank's outcome: status is one of "ok", "oom", "error", "timeout"."""

    rank: int
    status: str
    value: Any = None
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def describe(exc: BaseException) -> str:
    """``exc`` with its traceback, the last 4000 characters (where the error is)."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines)
    return text[-4000:]


def call(fn, args, device, budget_bytes, where: str | None = None, named: list | None = None) -> RankResult:
    """``fn(*args)`` as this rank's row; with ``where``, a collective's timeout names the absent
    ranks (`shardimpl.rendezvous.explain`; its `RanksMissing` is appended to ``named``)."""
    import torch.distributed as dist

    from shardimpl.budgets import budget, is_oom

    rank = dist.get_rank()
    try:
        if budget_bytes:
            with budget(budget_bytes, device=local_device(device)):
                value = fn(*args)
        else:
            value = fn(*args)
        return RankResult(rank, "ok", value)
    except BaseException as exc:  # a rank's failure is a result, whatever it is
        status = "oom" if is_oom(exc) else "error"
        if where is not None:
            from shardimpl.rendezvous import RanksMissing, explain

            missing = exc if isinstance(exc, RanksMissing) else explain(exc, where)
            if missing is not None:
                if named is not None:
                    named.append(missing)
                if missing is not exc:
                    return RankResult(rank, status, None, f"{describe(exc)}\n{type(missing).__name__}: {missing}")
        return RankResult(rank, status, None, describe(exc))


def local_device(device: str):
    """The device a budget applies to on this rank: "cpu", or its current CUDA device."""
    if device != "cuda":
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.current_device()}"
