"""The `masked_lm` evaluate module (masked_lm.py); the numbers come from training.metrics (one home)."""
