"""dalle: an open, fast, faithful reimplementation of OpenAI's DALL-E 1.

`import dalle` stays light: it imports no training code (no accelerate, no datasets), and
the models load only when `load_pipeline` is first used.
"""

__version__ = "0.1.0"
__all__ = ["load_pipeline", "Pipeline"]


def __getattr__(name: str):
    if name in __all__:
        from dalle.inference import pipeline  # lazy: `import dalle` (and `dalle --version`) stay light

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dalle' has no attribute {name!r}")
