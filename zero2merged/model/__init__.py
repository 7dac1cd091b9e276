"""The model: the base's config and files, its saved layouts (transformers' conversion mapping), the
weights a merge reads, the serving files carried beside the weights, checks on a saved folder.
"""
