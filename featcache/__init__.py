"""featcache: extract frozen-backbone embeddings once, cache them in Zarr, train heads in seconds."""

__version__ = "0.1.0"
