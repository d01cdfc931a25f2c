"""dalle: an open, fast, faithful reimplementation of OpenAI's DALL-E 1.

`import dalle` stays light: it imports no training code (no accelerate, no datasets).
"""

__version__ = "0.1.0"
