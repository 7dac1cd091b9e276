"""The vocabulary every layer shares: errors, DeepSpeed's and PEFT's key names, dtypes, the options a
user gives and the records the stages hand on. Plain data; nothing here reads a file.
"""
