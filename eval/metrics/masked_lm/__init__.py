"""The `masked_lm` evaluate module (masked_lm.py) and its evaluate-free core (classification.py)."""
