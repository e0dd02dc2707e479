"""What fails CI: the memory regression gate and the memory comparison of two pytest-benchmark runs."""
