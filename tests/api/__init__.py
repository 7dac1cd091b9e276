"""The pipeline and the training-job integrations."""
