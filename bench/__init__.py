"""Benchmarks (not tests): ``python -m bench.firmware_bench``; see ``bench/README.md``."""
