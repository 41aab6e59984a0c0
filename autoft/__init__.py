"""autoft: robust fine-tuning of CLIP-like models with a learned objective (AutoFT)."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user (paths, names, data): reported as one line, non-zero exit."""
