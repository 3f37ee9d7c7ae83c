"""The `protein_classification` evaluate module: accuracy, MCC and F1 of per-protein (or per-residue) class labels."""
