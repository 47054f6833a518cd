"""Checkpoints of other libraries → dynaseg weights files (``dynaseg convert``)."""
