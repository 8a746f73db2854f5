"""Post-processing: exact stitched connected components, polarity, partners, metrics, pipeline."""

from cleftwise.postprocess.errors import PostprocessError

__all__ = ["PostprocessError"]
