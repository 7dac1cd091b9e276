"""Saved layouts and serving files."""
