"""Benchmarks of lora_kernels against the base GEMM, PEFT and unfused PyTorch: `python -m bench`.

Layout: timing.py (the one timing helper), roofline.py (shapes, FLOP and byte formulas), common.py
(shared rows / PEFT construction), bench_<op>.py (one per op: cases, contenders, runner), report.py
(table, JSON, PNG), __main__.py (CLI), test_bench_<op>.py (pytest-benchmark suites: `pytest bench/`).
"""
