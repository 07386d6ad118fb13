"""ctr-ensemble: from click logs to a served, measured ensemble of CTR models."""

__version__ = "0.1.0"
