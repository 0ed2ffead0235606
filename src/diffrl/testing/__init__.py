"""Tiny random-weight models for tests, benchmarks and offline examples.

Everything here is built in-process (no network) and saved with the same
``save_pretrained`` layout the real models use, so that tests exercise the
loading code users hit.
"""
