"""The stages on their own."""
