"""Loading what a harness TOML or command line names: TOML files, factories, networks, settings.

A factory is "package.module:factory[.field]": it is code that is imported and called, so
only load specs you trust. `key_values` reads KEY=VALUE strings or a TOML table into the
keyword arguments of a defence kind (`defences`), `attack_specs` an [[attack]] array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

from .defences import check_keywords
from .threats import AttackSpec

_ATTACK_FIELDS = tuple(f.name for f in dataclasses.fields(AttackSpec))


def number(text: str) -> float:
    """A decimal number or a fraction such as "8/255" (ValueError otherwise)."""
    num, slash, den = text.partition("/")
    if not slash:
        return float(text)
    if float(den) == 0:
        raise ValueError(f"division by zero in {text!r}")
    return float(num) / float(den)



def load_toml(path) -> dict:
    """Read a TOML file with tomllib (Python >= 3.11) or its backport tomli (Python 3.10).

    Raises:
        ValueError: naming the file, when it cannot be read or is not valid TOML.
    """
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # TOMLDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid TOML: {e}") from None


def load_object(spec: str, kwargs: dict | None = None):
    """Build an object from "package.module:factory" or "package.module:factory.field".

    The factory is called with kwargs (an attribute that is not callable is used as is);
    ".field" then takes that attribute of the result, e.g.
    "pursamere_fast.pretrained:fashion_mnist.classifier". The module is imported and the
    factory called: only load specs you trust.

    Raises:
        ValueError: when spec is not of that form, cannot be imported, lacks the field, or
            the factory takes no argument of one of kwargs' names.
    """
    import importlib

    mod, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    name, *fields = attr.split(".")
    if not mod or mod.startswith(".") or not name or spec.count(":") != 1:
        raise ValueError(f"factory must look like 'package.module:factory[.field]', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from None
    if callable(obj):
        check_keywords(repr(spec), obj, kwargs or {})
        obj = obj(**(kwargs or {}))
    for f in fields:
        if not hasattr(obj, f):
            raise ValueError(f"cannot load {spec!r}: {type(obj).__name__} has no attribute {f!r}")
        obj = getattr(obj, f)
    return obj


def load_model(spec: str, kwargs: dict | None = None):
    """A network from a .safetensors file written by `nets.save_net`, else `load_object(spec, kwargs)`.

    Raises:
        ValueError: as `load_object` or `nets.load_net`, or kwargs given with a file.
    """
    if isinstance(spec, str) and spec.endswith(".safetensors"):
        from ..nets import load_net

        if kwargs:
            raise ValueError(f"{spec!r} is a weights file: it takes no keyword arguments, got {sorted(kwargs)}")
        if not os.path.isfile(spec):
            raise ValueError(f"no such file: {spec!r}")
        return load_net(spec)
    return load_object(spec, kwargs)


def number_or_text(value):
    """A string such as "0.1" or "8/255" as a float; any other value unchanged, for its own check to judge."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return number(value)
    return value


def key_values(items) -> dict:
    """KEY=VALUE strings (VALUE is JSON, a fraction such as 8/255, or text), or a TOML table."""
    if isinstance(items, dict):
        return {k: number_or_text(v) for k, v in items.items()}
    out = {}
    for it in items or []:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"expected KEY=VALUE, got {it!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = number_or_text(v)
    return out


def attack_specs(entries) -> list[AttackSpec]:
    """AttackSpecs from a TOML [[attack]] array; eps and alpha may be fractions such as "8/255".

    Raises:
        ValueError: an entry that is not a table, has an unknown key or an invalid value.
    """
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"[[attack]] must be a non-empty array of tables, got {entries!r}")
    specs = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"[[attack]] entry {i} must be a table, got {entry!r}")
        unknown = sorted(set(entry) - set(_ATTACK_FIELDS))
        if unknown:
            raise ValueError(f"[[attack]] entry {i} has unknown keys {unknown}; valid: {', '.join(_ATTACK_FIELDS)}")
        try:
            specs.append(AttackSpec(**{k: number_or_text(v) if k in ("eps", "alpha") else v
                                       for k, v in entry.items()}))
        except ValueError as e:
            raise ValueError(f"[[attack]] entry {i}: {e}") from None
    return specs


def load_purify_config(spec: str):
    """The PurifyConfig a factory spec gives (directly or as a dict of its fields).

    Raises:
        ValueError: as `load_object`, or when the object is neither.
    """
    from pursamere_fast import PurifyConfig

    cfg = load_object(spec)
    if isinstance(cfg, dict):
        cfg = PurifyConfig().with_overrides(**cfg)
    if not isinstance(cfg, PurifyConfig):
        raise ValueError(f"{spec!r} must give a PurifyConfig or a dict of its fields, got {type(cfg).__name__}")
    return cfg
