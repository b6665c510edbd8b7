"""A backend named with its options in one word, as the command line takes it: ``compile:aot=true``,
``compile:mode=reduce-overhead``, ``onnxruntime:precision=fp16``. No torch import: the CLI parses it first."""

from __future__ import annotations


def parse(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value:key=value``: the backend and its options ("true"/"false" become booleans,
    digits integers); variants of one backend can then be measured side by side under their own labels."""
    name, *pairs = spec.split(":")
    if not name:
        raise ValueError(f"backend {spec!r} must start with its name, as in compile:aot=true")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"backend option {pair!r} in {spec!r} must be key=value")
        options[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return name, options
