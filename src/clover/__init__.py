"""clover: CLOVER (Cross-Layer Orthogonal Vectors) for transformer attention."""

__version__ = "0.1.0"
