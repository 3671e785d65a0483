"""granet: GraNet sparse training (engine + trainer) and Ray Tune studies of it."""

__version__ = "0.1.0"
