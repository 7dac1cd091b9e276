"""Parity and block-at-a-time checks."""
