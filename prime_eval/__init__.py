"""prime-eval: zero-shot evaluation of ARM, MDM and MDM-Prime language models with valid likelihood bounds."""

__version__ = "0.1.0"
