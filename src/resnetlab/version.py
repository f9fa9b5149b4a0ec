"""The package version: one place, imported by the package and written into every checkpoint."""

__version__ = "0.1.0"
