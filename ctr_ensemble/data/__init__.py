"""Data: the Criteo layout, the synthetic generator and streaming readers."""
