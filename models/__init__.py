"""ConvForge's architecture families, classic to modern, behind one registry.

One family per public module; the registry's infrastructure is the `_private` modules
(`_registry` the decorator and builder, `_stages` shared stage helpers, `_pyramid` the detector
backbone, `_checkpoint` saving/loading and transfer, `_errors`/`_files` the leaf helpers).
"""

from typing import Any

from models._errors import ConvForgeError

__all__ = ["AuxLogits", "Choice", "ConvForgeError", "FloatRange", "IntRange", "build", "families", "family",
           "register", "tasks"]


def __getattr__(name: str) -> Any:
    """The registry's API, loaded on first use (PEP 562): the leaf helpers import without torch or the
    families, so a stage that only needs `ConvForgeError` does not depend on every model file."""
    if name not in __all__:  # also how `from models import _registry` finds the submodule
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    from models import _registry

    return getattr(_registry, name)
