"""The toy world's models and evaluation: configs (models), the analytic judge, diffusers export."""
