"""
cargobay: a read-only pull-through caching proxy for OCI/Docker registries.
"""

__version__ = "0.1.0"
