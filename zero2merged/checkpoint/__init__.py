"""What DeepSpeed wrote: where the tag is, the layout of its rank files, one save's files only, the
fp32 masters read a piece at a time (ZeRO-0 to 3), a QLoRA run's 4-bit state, the adapter's keys.
"""
