"""Evaluation on the paper's benchmarks (issue 5): data readers and official scoring."""
