"""Benchmarks behind ``streamer bench NAME`` (also runnable from ``benchmarks/``)."""
