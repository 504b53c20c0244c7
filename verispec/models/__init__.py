"""Named models, their PyPI sources, verified files, and how a name or path becomes a model file."""
