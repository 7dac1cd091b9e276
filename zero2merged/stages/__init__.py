"""The six stages, in order: inspect, consolidate, rebuild, load, merge, save. Each is a
:class:`~zero2merged.running.runner.Stage` writing one artifact to the work directory; the merge's
shard writer and its helper processes live here too.
"""
