"""`make bench` / `python -m bench`: the repository's entry point to the benchmarks of `lora_kernels.bench`.

The benchmark code ships in the package (lora_kernels/bench/: timing.py, roofline.py, common.py,
bench_<op>.py, report.py, __main__.py), so an installed user has it too (`python -m lora_kernels bench`).
This folder keeps the checkout's entry point (outputs in bench/out/), the pytest-benchmark suites
(test_bench_<op>.py: `pytest bench/`), the method (README.md) and the measured results (RESULTS.md).
"""
