"""Train losses under the family's map, with and without sequence parallelism, against stock Keras.

`python -m bench.tools.sp_losses [--family llama] [--size 16] [--seq 512] [--batch 8] [--ranks 2] [--steps 3]`

The bench's step (AdamW, float32, ``--batch`` x ``--seq`` tokens) on a family of ``--size`` MiB
of parameters: ``--steps`` ``train_on_batch`` losses on ``--ranks`` gloo ranks under the
family's LayoutMap with ``seq`` (the stream split along the sequence where it divides) and
without it (`--layouts whole-stream`), each against stock single-process Keras from the same
initial weights. Prints each pair and the largest relative difference; exits 1 when one
exceeds ``--rtol`` (default 1e-5), so a figure in the docs can be re-checked with one command.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

MAPS = (("sequence-parallel", True), ("whole stream", False))


def _distribute(family: str, size: int, train, split_sequence: bool) -> None:
    import keras

    import shardimpl
    from bench.harness.families import layout_map, model_mesh

    shardimpl.install()
    mesh = model_mesh(family, keras.distribution.list_devices())
    seq = train.seq if split_sequence else None
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map(family, mesh, size, batch=train.batch, seq=seq)))


def _numpy(data):
    return {k: v.numpy() for k, v in data.items()} if isinstance(data, dict) else data.numpy()


def losses(family: str, size: int, train, steps: int, split_sequence=None, initial=None) -> dict:
    """One rank's losses of ``steps`` steps and the weights it started from. ``split_sequence``:
    None runs stock Keras (no distribution), True / False the family's map with / without ``seq``.
    ``initial``: weights to start from (the sharded run's, for stock Keras)."""
    import keras

    from bench.harness import training
    from bench.harness.families import build_model

    if split_sequence is not None:
        _distribute(family, size, train, split_sequence)
    keras.utils.set_random_seed(3)
    model = build_model(family, size, batch=train.batch, seq=train.seq)
    start = model.get_weights()
    if initial is not None:
        model.set_weights(initial)
    training.compile_model(model, family, train)
    x, y = training.train_data(family, size, train)
    x, y = _numpy(x), _numpy(y)
    return {"losses": [float(model.train_on_batch(x, y)) for _ in range(steps)], "initial": start}


def _values(rows):
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        raise SystemExit("\n".join(f"rank {r.rank}: {r.status}\n{r.error}" for r in bad))
    return [r.value for r in rows]


def compare(family: str, size: int, train, steps: int, ranks: int, label: str, split_sequence: bool) -> float:
    """The largest relative difference between the sharded run's losses (every rank's) and stock's."""
    from shardimpl import launch

    sharded = _values(launch.run(losses, ranks, family, size, train, steps, split_sequence, None, timeout=900))
    stock = _values(launch.run(losses, 1, family, size, train, steps, None, sharded[0]["initial"],
                               timeout=900))[0]["losses"]
    print(f"{family} {size >> 20} MiB seq {train.seq} N={ranks} {label}: sharded {sharded[0]['losses']}, "
          f"stock {stock}")
    return max(abs(a - b) / abs(b) for rank in sharded for a, b in zip(rank["losses"], stock))


def main(argv=None) -> int:
    from bench.harness.families import FAMILIES
    from bench.harness.training import TrainConfig

    p = argparse.ArgumentParser(prog="python -m bench.tools.sp_losses", description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=[f for f in FAMILIES if f != "mlp"], default="llama")
    p.add_argument("--size", type=int, default=16, help="parameter MiB (default: 16)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rtol", type=float, default=1e-5)
    args = p.parse_args(argv)
    train = TrainConfig(optimizer="adamw", precision="float32", seq=args.seq, batch=args.batch)
    worst = {label: compare(args.family, args.size << 20, train, args.steps, args.ranks, label, split)
             for label, split in MAPS}
    for label, rel in worst.items():
        print(f"{label}: largest relative loss difference {rel:.2e} (rtol {args.rtol:g})")
    return int(any(rel > args.rtol for rel in worst.values()))


if __name__ == "__main__":
    sys.exit(main())
