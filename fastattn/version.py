"""The package version, in one place: fastattn/__init__.py imports it and setup.py reads this file's text."""
__version__ = "0.1.0"
