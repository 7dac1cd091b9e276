"""Running the stages: the runner and its manifest (a stage skipped when still valid), progress, the
report and model card, and the process settings a run touches.
"""
