"""Benchmarks: speed targets are measured here, side by side with peers, never asserted in timed tests."""
