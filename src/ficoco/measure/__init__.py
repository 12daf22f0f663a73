"""Measuring what a method costs and gains: the FLOPs calculator (``flops.py``, LLaVA and Qwen-VL
shapes), budgets and the TFLOPs solver (``budget.py``), and the GPU speed benchmark
(``bench.py``, ``bench_report.py``)."""
