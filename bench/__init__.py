"""Benchmarks: measured side by side in one run, printed as tables and ratios; never part of the tests."""
