"""The package version, in a module of its own so that any layer can read it without importing
the public front door (``attnlang/__init__`` imports the api)."""

__version__ = "0.1.0"
