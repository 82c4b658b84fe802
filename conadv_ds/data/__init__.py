"""Data pipelines used by the recipes."""
