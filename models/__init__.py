"""ConvForge's architecture families, classic to modern, behind one registry.

One family per public module; the registry's infrastructure is the `_private` modules
(`_registry` the decorator and builder, `_stages` shared stage helpers, `_pyramid` the detector
backbone, `_checkpoint` saving/loading and transfer, `_errors`/`_files` the leaf helpers).
"""

from models._errors import ConvForgeError
from models._registry import AuxLogits, Choice, FloatRange, IntRange, build, families, family, register

__all__ = ["AuxLogits", "Choice", "ConvForgeError", "FloatRange", "IntRange", "build", "families", "family",
           "register"]
