"""Benchmarks: each writes JSONL (config, git revision, hardware, library versions) and a PNG plot."""
