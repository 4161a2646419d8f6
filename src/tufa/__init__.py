"""tufa: self-hosted secure over-the-air updates built on The Update Framework."""

__version__ = "0.1.0"
