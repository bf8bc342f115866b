"""caspl: Cascade Prompt Learning (CasPL) studies on open_clip, distributed with Ray."""

__version__ = "0.1.0"
