"""Evaluation: generation, scorers, the LLM judge."""
