"""Evaluating runs: image metrics, analytic judges, the HTML report."""
