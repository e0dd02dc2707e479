"""The benchmark harness: `python -m bench` and its subcommands, the asv and pytest-benchmark suites.

* `bench.harness`: model families and the scenarios measured on launched ranks (what is run).
* `bench.report`: results as data, the table and verdicts, plots, report.html (what is shown).
* `bench.gates`: the memory regression gate and the pytest-benchmark memory comparison (what fails CI).
* `bench.tools`: planning at scale, peers, step speed, first-step latency, init speed (questions beside the main job).
* `bench.suites`: the asv suites (asv's benchmark_dir) and the pytest-benchmark suite.
* `bench.__main__`, `bench.cli`, `bench.stopping`: the command line.

Layers: suites and tools use the harness; the report reads rows only; nothing here imports
shardimpl's private names.
"""
