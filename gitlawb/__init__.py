"""A node of the gitlawb network."""

__version__ = "0.1.0"
