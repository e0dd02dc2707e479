"""The benchmark suites: asv's benchmark_dir (bench_*.py) and pytest-benchmark's (test_*.py)."""
