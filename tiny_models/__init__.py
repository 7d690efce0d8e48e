"""Tiny random-weight models built offline from configs, for the test suite and ``make demo`` only.

Real runs load hub names or paths; nothing outside tests, the demo and the CPU benchmarks imports this.
"""
