"""DEEPER: directed persona refinement (arXiv 2502.11078) as a library the DVC stages call."""

__version__ = "0.1.0"
