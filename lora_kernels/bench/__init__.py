"""Benchmarks of lora_kernels against the base GEMM, PEFT and unfused PyTorch.

`python -m lora_kernels.bench` (also `python -m lora_kernels bench`, `lora-kernels-bench`, and `make bench` /
`python -m bench` in a checkout). Layout: timing.py (the one timing helper), roofline.py (shapes, FLOP and
byte formulas), common.py (shared rows, PEFT construction, timing a case's contenders together),
bench_<op>.py (one per op: cases, contenders, runner; bench_overhead.py: per-call host time), report.py
(ratios, tables, JSON, PNG), __main__.py (CLI). The method: bench/README.md in the repository.
"""
