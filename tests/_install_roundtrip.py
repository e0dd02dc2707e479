"""Run in a fresh interpreter: install/uninstall round trips compared with a pristine snapshot.

Prints one JSON object: for each scenario, the differences found (empty = exact).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402,F401

import shardimpl  # noqa: E402
from shardimpl.keras import patches, rules  # noqa: E402


def _namespaces():
    out = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("keras") or mod is None:
            continue
        out.append(mod)
        for value in list(vars(mod).values()):
            if isinstance(value, type) and getattr(value, "__module__", "").startswith("keras"):
                out.append(value)
    return out


def snapshot():
    attrs = {}
    for ns in _namespaces():
        for key, value in list(vars(ns).items()):
            attrs[f"{getattr(ns, '__qualname__', getattr(ns, '__name__', ns))}@{id(ns)}.{key}"] = id(value)
    tables = {f"{name}[{op}]": id(v) for name, table in rules.strategy_tables().items() for op, v in table.items()}
    from torch.distributed.tensor import DTensor

    flags = {"allow_implicit_replication": DTensor._op_dispatcher._allow_implicit_replication}
    return {"attribute": attrs, "dtensor table": tables, "environ": dict(os.environ), "dtensor flags": flags}


def diff(before, after):
    out = []
    for label in before:
        a, b = before[label], after[label]
        out += [f"{label}: {k}" for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    return out[:20]


def main():
    table = patches.patch_table()
    for row in table:  # import every module the table touches, without patching anything
        row.targets()
    pristine = snapshot()
    report = {}
    shardimpl.install()
    report["install_changes_something"] = len(diff(pristine, snapshot()))
    shardimpl.uninstall()
    report["round_trip"] = diff(pristine, snapshot())
    for fail_at in (0, 3, 8, len(table) - 2, len(table) - 1):
        rows = list(table)

        def boom(_original):
            raise RuntimeError("injected failure")

        rows[fail_at] = dataclasses.replace(rows[fail_at], replacement=boom)
        saved, patches.patch_table = patches.patch_table, (lambda rows=rows: rows)
        try:
            shardimpl.install()
            report[f"fail_at_{fail_at}"] = ["install() did not raise"]
        except RuntimeError as exc:
            report[f"fail_at_{fail_at}"] = diff(pristine, snapshot()) + (
                [] if "injected failure" in str(exc) else [f"unexpected error {exc}"])
            if shardimpl.is_installed():
                report[f"fail_at_{fail_at}"].append("is_installed() is True after a failed install")
        finally:
            patches.patch_table = saved
    shardimpl.install()
    shardimpl.uninstall()
    report["round_trip_after_failures"] = diff(pristine, snapshot())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
