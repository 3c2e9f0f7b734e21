"""The market simulator: recordings of a known surface with their ground truth."""
