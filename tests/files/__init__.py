"""Bytes on disk: safetensors, CRC-32 records, hostile headers."""
