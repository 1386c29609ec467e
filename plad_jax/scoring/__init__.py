"""Scoring: rewards (ROUGE, reward models, Python scorers) and the evaluation report."""
