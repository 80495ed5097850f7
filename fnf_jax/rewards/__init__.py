"""Rewards (score + heatmap), their registry, and heatmap -> mask post-processing."""
