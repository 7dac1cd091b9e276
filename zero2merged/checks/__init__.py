"""Proving a merge right: seeded probe inputs and the parity measure, one LoRA layer merged and checked
on its own, and a model run a block at a time from its files.
"""
