"""Benchmarks: scripts that print a table and write JSON (numbers go to docs/benchmarks.md).

    python -m tools.bench.attention    attention kernels, forward+backward (GPU; --smoke on CPU)
    python -m tools.bench.train        the real trainer on random tokens: tokens/s, MFU, peak memory
    python -m tools.bench.preprocess   data prep against the tokenizer's own ceiling
    tools/compare_runs.py bench        (tools.bench.compare) configs side by side at equal tokens/step
    tools/gpu_check.py                 the one-GPU check: gpu tests, 1.3B training and attention benchmarks
"""
