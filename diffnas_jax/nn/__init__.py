"""Flax building blocks for user-defined search spaces: ``Choice``, ``InputChoice``,
``WidthChoice`` and the :func:`choice_mode` context (see :mod:`diffnas_jax.nn.choice`)."""
from .choice import COLLECT, FIXED, HARD, MIXED, Choice, ChoiceInfo, InputChoice, WidthChoice, choice_mode

__all__ = ["Choice", "InputChoice", "WidthChoice", "ChoiceInfo", "choice_mode", "MIXED", "HARD", "FIXED", "COLLECT"]
