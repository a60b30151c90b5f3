"""ConvForge's architecture families, classic to modern, behind one registry (see registry.py)."""

from models.registry import AuxLogits, Choice, FloatRange, IntRange, build, families, family, register

__all__ = ["AuxLogits", "Choice", "FloatRange", "IntRange", "build", "families", "family", "register"]
