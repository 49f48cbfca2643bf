"""landscape: train Vision Transformer variants with dense checkpoints and measure their loss landscape."""

__version__ = "0.1.0"

from landscape.errors import LandscapeError  # noqa: E402,F401
