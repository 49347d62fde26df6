"""Comparing masks with ground truth: metrics, lesion-wise detection, ``evaluate`` over folders, and the
synthetic phantoms with known kidneys and tumors that tests and benchmarks evaluate against.
"""
