"""Runnable examples: ``python -m examples.<name> [--url URL]`` (see examples/README.md)."""
