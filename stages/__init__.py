"""Stage processes of sipbridge. Each module exposes a click ``command``."""
