"""Post-processing: exact stitched connected components, polarity, partners, metrics, pipeline."""

from .errors import PostprocessError

__all__ = ["PostprocessError"]
