"""Reading what DeepSpeed wrote."""
