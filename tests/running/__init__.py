"""The runner, manifest and report."""
