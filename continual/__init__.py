"""continual: keeps a deployed PyTorch classifier current."""

__version__ = "0.1.0"
