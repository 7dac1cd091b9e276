"""Whole conversions of real DeepSpeed checkpoints: every fixture, the faults, the fuzzer, the family sweep."""
