"""The one error type users see: the leaf every package imports (models, pipelines, services)."""


class ConvForgeError(Exception):
    """A user-facing error (bad params, missing data, corrupt input): printed as one line."""
