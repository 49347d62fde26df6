"""The package version: a leaf module, so any module can name the version without importing the API."""

__version__ = "0.7.1"
