"""Low-precision training converters, applied to a built model (``float8``: ``model.fp8``)."""
