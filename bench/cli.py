"""The main job's command line: options, their checks and the help text.

Nothing here imports torch or keras: `python -m bench --help` and every option error answer
at once, and every check runs before any rank starts. Errors are one line:
``python -m bench: error: <what must hold>. Received: <value> (see python -m bench --help)``,
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os

from bench.harness.families import FAMILIES, HUB
from bench.harness.peer_layouts import LAYOUTS
from bench.harness.scenarios import MODES

MiB = 1 << 20
PROG = "python -m bench"
DEFAULT_FAMILIES = tuple(f for f in FAMILIES if f not in HUB)  # keras-hub families on request
DEFAULT_SIZES_MIB = (8, 32, 128)
DEFAULT_RANKS = (1, 2, 4)
DEFAULT_MODES = ("unsharded", "sharded")
QUICK_SIZES_MIB = (8, 32)
QUICK_RANKS = (1, 2)
MAIN_JOB_SECONDS = "about a minute"  # about 100 CPU-seconds: see the README

_QUICK = f"{','.join(map(str, QUICK_SIZES_MIB))} MiB, N = {','.join(map(str, QUICK_RANKS))}"
SUBCOMMANDS = f"""\
subcommands ({PROG} SUBCOMMAND --help for each one's options):
  run             the main job (the default: `{PROG}` is `{PROG} run`)
                    {PROG} --quick --out /tmp/smoke
  peers           stock Keras, naive and sharded beside keras-native, keras-jax and fsdp2
                    {PROG} peers --families mlp --sizes 16,64 --ranks 1,2
  plan            per-rank peaks at scale, predicted with fake tensors (no memory used)
                    {PROG} plan --family transformer --params 70B --ranks 8,64,1024
  gate            the memory regression gate CI runs (exit 1 on a violation)
                    {PROG} gate
  compare-memory  gate per-rank peaks between two pytest-benchmark JSON files
                    {PROG} compare-memory bench-results/pb/base.json bench-results/pb/new.json
  speed           train-step time against stock Keras and a hand-written TP step, interleaved
                    {PROG} speed --families mlp,transformer --size-mib 64 --ranks 2
  step-phases     where a step's CPU goes, by phase and thread: shardimpl, stock, hand-written
                    {PROG} step-phases --family mlp --size-mib 64 --skip-collectives
  first-step      first-step and new-shape latency against stock Keras
                    {PROG} first-step --families mlp,transformer
  optimizer-memory  whole-run peaks and step times, Keras' optimizer update against shardimpl's chunked one
                    {PROG} optimizer-memory --ranks 2 --families mlp,transformer
  init-speed      rank 0's cost of shard-local initialization at N ranks
                    {PROG} init-speed --ranks 1,16,256,1024
  partial-batch   cost of a batch the data axis does not divide (run replicated)
                    {PROG} partial-batch --mesh dp --width 256 --batch 4096

examples:
  {PROG}                # the main job: {MAIN_JOB_SECONDS} on 2 idle cores
  {PROG} --quick        # smoke run: sizes {_QUICK}, build only
  {PROG} --families mlp --sizes 32,128 --ranks 1,2,4 --budget 96 --out /tmp/r

exit status: 0 done, 1 a rank failed (error/timeout, see results.json), 2 bad options,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong, what was received, what to do."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- option types: each raises with the valid choices and the value received --------------


def _positive_ints(what, example):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            values = tuple(sorted({int(x) for x in items}))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected {what}: positive whole numbers separated by commas, e.g. {example}. "
                f"Received: {text!r}")
        return values
    return parse


def _names(what, valid):
    def parse(text):
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in valid]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; choose from "
                f"{', '.join(valid)}, separated by commas. Received: {text!r}")
        return items
    return parse


def _budget(text):
    t = text.strip().lower()
    if t in ("auto", "none"):
        return t
    try:
        value = float(t)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected 'auto', 'none' or a positive number of MiB per rank, e.g. 192. Received: {text!r}")
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, e.g. 300. Received: {text!r}")
    return value


def make_parser(prog=PROG, description=None):
    p = Parser(prog=prog, description=description, epilog=SUBCOMMANDS,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", type=_names("family", FAMILIES), default=None, metavar="LIST",
                   help=f"model families, from {','.join(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)}; "
                        f"{','.join(HUB)} are keras-hub backbones and need keras-hub installed)")
    p.add_argument("--sizes", type=_positive_ints("sizes in MiB", "16,64,256"), default=None, metavar="MIB",
                   help=f"parameter sizes in MiB (default: {','.join(map(str, DEFAULT_SIZES_MIB))})")
    p.add_argument("--ranks", type=_positive_ints("world sizes", "1,2,4"), default=None, metavar="N",
                   help=f"world sizes (default: {','.join(map(str, DEFAULT_RANKS))})")
    p.add_argument("--modes", type=_names("mode", MODES), default=None, metavar="LIST",
                   help=f"from {','.join(MODES)} (default: {','.join(DEFAULT_MODES)}; keras-native needs "
                        f"keras-nightly: `{PROG} peers` makes its environment)")
    p.add_argument("--budget", type=_budget, default="auto", metavar="MIB",
                   help="per-rank budget for the largest size's second build: 'auto' = 3/4 of the largest "
                        "size (stock Keras cannot fit, sharded N >= 2 can), 'none', or MiB (default: auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: gloo ranks on this machine's cores; cuda: one rank per GPU (default: cpu)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder, created if missing (default: bench-results/)")
    p.add_argument("--timeout", type=_seconds, default=300.0, metavar="S",
                   help="seconds per scenario before its ranks are stopped (default: 300)")
    p.add_argument("--no-step", action="store_true", help="measure the build only, no train step")
    p.add_argument("--step-every-size", action="store_true",
                   help="measure the train step at every size (default: at the largest size only, on "
                        "every N: the figure the verdict reports; the step costs more than the build)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: sizes {','.join(map(str, QUICK_SIZES_MIB))} MiB, N = "
                        f"{','.join(map(str, QUICK_RANKS))}, build only; options given explicitly still apply")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--mesh", type=_meshes, default=(None,), metavar="LIST",
                   help="meshes for the sharded modes: 1d (the family's own) and/or BxM, a (\"batch\", "
                        "\"model\") mesh of B x M ranks run where B x M is in --ranks (default: 1d; "
                        "e.g. --mesh 1d,2x2)")
    p.add_argument("--layouts", choices=LAYOUTS, default="family",
                   help="LayoutMaps on the 1-D mesh: the family's own; whole-stream, the family's with the "
                        "residual stream whole (no sequence parallelism: transformer, gemma, llama); or "
                        "width-split, the "
                        "families' previous maps (what `peers` runs keras-native on where it fails on the "
                        "family's) (default: family)")
    from bench.harness.training import DEFAULT

    return add_train_options(p, DEFAULT)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, e.g. 8. Received: {text!r}")
    return value


def add_train_options(p, defaults, *, batch_default_text=None):
    """--optimizer, --precision, --remat, --seq, --batch: the train step measured
    (`bench.harness.training.TrainConfig`); ``defaults`` is a TrainConfig."""
    from bench.harness.training import OPTIMIZERS, PRECISIONS, REMATS

    g = p.add_argument_group("the train step (Keras' own: compile + train_step)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                   help=f"sgd: SGD with momentum 0.9; adamw: AdamW (default: {defaults.optimizer})")
    g.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                   help="Keras dtype policy: float32; mixed_bfloat16 (float32 variables, bfloat16 compute); "
                        f"bfloat16 (bfloat16 variables) (default: {defaults.precision})")
    g.add_argument("--remat", choices=REMATS, default=defaults.remat,
                   help="full: every block recomputed in backward, keeping only its input "
                        f"(keras.RematScope) (default: {defaults.remat}"
                        + ("; none for the mlp in mixed_bfloat16)" if defaults.remat == "full" else ")"))
    g.add_argument("--seq", type=positive_int, default=defaults.seq, metavar="N",
                   help=f"tokens per sequence, transformer and keras-hub families (default: {defaults.seq})")
    g.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="global batch, split over the data axis of a BxM mesh, whole on every rank of a "
                        f"1-D mesh (default: {batch_default_text or defaults.batch})")
    return p


def train_flags(train) -> list[str]:
    """The command-line options that select ``train`` (a TrainConfig): for a run in another process."""
    return ["--optimizer", train.optimizer, "--precision", train.precision, "--remat", train.remat,
            "--seq", str(train.seq), "--batch", str(train.batch)]


def train_config(args, *, batch=None):
    """The TrainConfig of parsed options (``batch`` when --batch was not given)."""
    from bench.harness.training import TrainConfig

    return TrainConfig(optimizer=args.optimizer, precision=args.precision, remat=args.remat, seq=args.seq,
                       batch=args.batch or batch or TrainConfig().batch)


def _meshes(text):
    from bench.harness.families import parse_mesh

    try:
        return tuple(parse_mesh(m) for m in text.split(",") if m) or (None,)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _has_keras_hub() -> bool:
    import importlib.util

    return importlib.util.find_spec("keras_hub") is not None and importlib.util.find_spec("grain") is not None


def _has_keras_nightly() -> bool:
    from importlib import metadata

    for dist in ("keras-nightly", "keras"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "keras-nightly" or ".dev" in version:
            return True
    return False


def check_out(path, option="--out", example="--out bench-results") -> str | None:
    """None when ``path`` is (now) a folder we can write to, else why not."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bench-write-test-"):
            pass
    except OSError as exc:
        return (f"{option}: cannot create or write to the folder {path!r} ({exc.strerror or exc}); "
                f"choose a writable folder, e.g. {example}")
    return None


def parse_args(argv, *, parser=None, out_default="bench-results", modes_default=DEFAULT_MODES,
               native_here=True):
    """Parsed and validated options: every check runs here, before any rank starts."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    quick = args.quick
    args.families = args.families or DEFAULT_FAMILIES
    hub = [f for f in args.families if f in HUB]
    if hub and not _has_keras_hub():
        p.error(f"--families {','.join(hub)}: keras-hub is not installed; install it with "
                "pip install --no-deps keras-hub==0.32.0 && pip install -e '.[hub]'")
    args.sizes = args.sizes or (QUICK_SIZES_MIB if quick else DEFAULT_SIZES_MIB)
    args.ranks = args.ranks or (QUICK_RANKS if quick else DEFAULT_RANKS)
    args.modes = args.modes or modes_default
    args.no_step = args.no_step or quick
    args.out = args.out or out_default
    if args.layouts == "width-split" and (hub or args.mesh != (None,)):
        p.error("--layouts width-split: the previous width-split maps exist for the mlp and transformer families "
                f"on their 1-D mesh. Received: --families {','.join(args.families)}"
                + (" --mesh " + ",".join(m and f"{m[0]}x{m[1]}" or "1d" for m in args.mesh) if args.mesh != (None,) else "")
                + "; drop --layouts or choose --families mlp,transformer without --mesh")
    if native_here and "keras-native" in args.modes and not _has_keras_nightly():
        p.error("--modes keras-native needs keras-nightly, which this environment lacks; "
                f"`{PROG} peers` measures it in its own virtualenv")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: this machine has no usable CUDA device; use --device cpu")
    problem = check_out(args.out)
    if problem:
        p.error(problem)
    args.train = train_config(args)
    _check_train(p, args.families, args.train)
    return args


def _check_train(parser, families, train) -> None:
    from bench.harness.training import check_supported

    for family in families:
        try:
            check_supported(family, train)
        except ValueError as exc:
            parser.error(str(exc))


def budget_bytes(budget, sizes):
    if budget == "none":
        return None
    if budget == "auto":
        return int(0.75 * max(sizes) * MiB)
    return int(budget * MiB)
