"""The coverage sweep: every family of transformers' model registry, built tiny and upcycled.

    python -m tests.coverage.sweep [--jobs N] [--timeout S] [FAMILY ...]

See tests/coverage/sweep.py for the whole command, and README.md's coverage table for its result.
"""
