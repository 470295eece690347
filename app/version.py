"""The service version, reported by /health and omni_build_info."""
__version__ = "1.0.0"
