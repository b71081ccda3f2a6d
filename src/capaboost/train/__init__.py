"""Training-time helpers: split protocols and evaluation metrics."""
