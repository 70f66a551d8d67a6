"""Evaluation of explanations: accuracy against ground truth, insertion/deletion."""
