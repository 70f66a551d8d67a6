"""The training loop shared by the stages."""
