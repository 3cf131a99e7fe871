"""metarm-fast: MetaRM reward-model training."""
__version__ = "0.1.0"
