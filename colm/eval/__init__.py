"""Evaluation: per-scale perplexity and an lm-evaluation-harness adapter."""
