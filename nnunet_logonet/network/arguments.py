"""Checks of constructor arguments, shared by the network and the SSL pieces.

MONAI-style: a bad argument is a ``ValueError`` at construction, naming the argument, the value
given and what is allowed, instead of a traceback from inside PyTorch at the first forward. NumPy
scalars count as the Python numbers they hold (values read from plans or arrays often are);
``bool`` does not count as a number.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Sequence

import numpy as np

__all__ = ["positive_int", "int_list", "real_number", "probability", "boolean"]


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum`` (numpy ints accepted, bools refused)."""
    if not isinstance(value, Integral) or isinstance(value, (bool, np.bool_)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def int_list(values: Any, name: str, minimum: int = 1, length: int | None = None) -> tuple[int, ...]:
    """A non-empty sequence of ints ``>= minimum`` (``length`` of them where given), as a tuple."""
    if isinstance(values, (str, bytes, set, frozenset, Integral)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be a list of ints, got {values!r}")
    items = tuple(values)
    if not items or not all(isinstance(v, Integral) and not isinstance(v, (bool, np.bool_)) and v >= minimum
                            for v in items):
        raise ValueError(f"{name} must be a non-empty list of ints >= {minimum}, got {values!r}")
    if length is not None and len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}: {values!r}")
    return tuple(int(v) for v in items)


def real_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                exclusive_minimum: bool = False, exclusive_maximum: bool = False) -> float:
    """``value`` as a finite Python float within the bounds given (inclusive unless said otherwise)."""
    allowed = []
    if minimum is not None:
        allowed.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        allowed.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
    wanted = f"a finite number{' ' + ' and '.join(allowed) if allowed else ''}"
    if not isinstance(value, Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    number = float(value)
    too_low = minimum is not None and (number <= minimum if exclusive_minimum else number < minimum)
    too_high = maximum is not None and (number >= maximum if exclusive_maximum else number > maximum)
    if too_low or too_high:
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number


def probability(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1]."""
    return real_number(value, name, minimum=0.0, maximum=1.0)


def boolean(value: Any, name: str) -> bool:
    """``value`` as a Python bool: ``True``/``False`` (NumPy's too) or the ints 1/0; not 'no' or 2."""
    if not (isinstance(value, (bool, np.bool_)) or (isinstance(value, Integral) and value in (0, 1))):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)
