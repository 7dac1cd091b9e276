"""The shared vocabulary: options and records."""
