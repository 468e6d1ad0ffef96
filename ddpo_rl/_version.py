"""The package version, in a leaf module: modules inside ddpo_rl read it without importing the package's top level."""

__version__ = "0.1.0"
