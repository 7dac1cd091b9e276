"""Bytes on disk, whatever they hold: safetensors read and written a tensor at a time, ``torch.save``
files unpickled safely, CRC-32 checks of their records, files replaced atomically.
"""
