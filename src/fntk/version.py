"""The fntk version (written into saved adapters)."""

__version__ = "0.1.0"
