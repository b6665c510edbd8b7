"""Values from users, checked once: numbers of any Python or JSON form, and prompts.

Every number a call, a file header or a request body gives goes through :func:`number` or :func:`integer`,
which take ints of any size and floats (numpy's too) and answer with a checked float or int, or a ValueError
naming the setting, the value (a huge one shortened) and the bound; bools and strings are refused, not read.
``math.isfinite`` alone raises OverflowError on a 400-digit int, and ``float()`` turns a bool into a number:
neither reaches the settings. :func:`prompt_text` refuses text no tokenizer can encode (lone surrogates, which
also come from a command line decoded with another encoding) and text longer than ``MAX_PROMPT_CHARS``.
"""

from __future__ import annotations

import math
import numbers

MAX_PROMPT_CHARS = 20_000  # CLIP reads 77 tokens and T5 512: past this a prompt only costs time and memory


def shown(value) -> str:
    """A value for a message: a huge int by its digit count, long text cut."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _bound(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {_bound(low)}"
    if low is None:
        return f"{'<' if high_open else '<='} {_bound(high)}"
    return f"in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"


def _within(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or not (value > high or (high_open and value == high))


def number(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within [low, high] (an end excluded with ``low_open``/``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{name} must be a number, got {shown(value)} ({kind})")
    if isinstance(value, numbers.Integral) and not _within(int(value), low, high, low_open, high_open):
        raise ValueError(f"{name} must be a number {_bounds(low, high, low_open, high_open)}, got {shown(int(value))}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    if not _within(result, low, high, low_open, high_open):
        raise ValueError(f"{name} must be a number {_bounds(low, high, low_open, high_open)}, got {shown(value)}")
    return result


def integer(name: str, value, low=None, high=None) -> int:
    """``value`` as an int within [low, high]; floats and bools are refused (3.0 steps is a mistake to say)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise ValueError(f"{name} must be an integer, got {shown(value)} ({kind})")
    value = int(value)
    if not _within(value, low, high, False, False):
        raise ValueError(f"{name} must be an integer {_bounds(low, high, False, False)}, got {shown(value)}")
    return value


def prompt_text(name: str, text: str) -> str:
    """``text`` once it can be encoded (UTF-8) and is at most MAX_PROMPT_CHARS long."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are taken (the text "
                         "encoders read the first few hundred tokens)")  # fmt: skip
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start]
        raise ValueError(f"{name} cannot be encoded: character {err.start} is {bad!r}, a lone surrogate (text "
                         "decoded with the wrong encoding, or a broken \\ud8xx escape)") from None
    return text


def fields(record, spec: dict, where: str) -> dict:
    """``record`` (parsed JSON) checked to be an object holding each field of ``spec`` (name -> a type, or a
    tuple of types; ``type(None)`` among them for a field that may be null or absent); a ValueError names
    ``where`` and the field. Returns ``record``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a JSON object, got {_json_kind(record)}")
    for name, kinds in spec.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        value = record.get(name)
        if name not in record and type(None) not in kinds:
            raise ValueError(f"{where} has no {name!r} field")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(_json_kind(k) for k in kinds)
            raise ValueError(f"{where}: {name!r} must be {wanted}, got {_json_kind(value)}")
    return record


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false", type(None): "null"}  # fmt: skip


def _json_kind(value) -> str:
    kind = value if isinstance(value, type) else type(value)
    return _JSON_KINDS.get(kind, kind.__name__)
