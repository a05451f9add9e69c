"""Errors raised while reading model files (config, weights).

`WeightLoadError` is a ValueError so callers that only know "bad input" still
catch it; its message always names the file and, where there is one, the field
or tensor at fault.
"""


class WeightLoadError(ValueError):
    """A model directory or weights file cannot be loaded as asked."""
