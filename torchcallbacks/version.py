"""The library's version, in a module of its own so that every layer can read it (the package root
re-exports it) without importing anything above itself."""

__version__ = "0.1.0"
