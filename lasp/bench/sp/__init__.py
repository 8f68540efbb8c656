"""Scaling benchmarks of the SP methods: measured side by side (`sweep`, under torchrun), per-rank compute of
any W on one device (`simulate`), and an alpha-beta cost model fitted and validated on the measured points
(`model`). See `python -m lasp.bench.sp --help`."""
