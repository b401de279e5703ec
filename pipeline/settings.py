"""Checking settings sections against their dataclasses, shared by curation recipes and training recipes.

A section is a mapping read from YAML (plus ``--set`` overrides); ``build_params`` checks every key against the
dataclass's fields and every value against the field's type, so that a typo or a wrong type is an error naming
what is expected rather than a silently ignored setting. This module imports nothing from the stages or the
models, so both sides can use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

Params = TypeVar("Params")


class ConfigError(ValueError):
    """A configuration problem, described for a person (what is wrong and how to fix it)."""


def build_params(params_cls: type[Params], settings: dict[str, Any], where: str) -> Params:
    """An instance of the dataclass ``params_cls`` from ``settings``; ``where`` names the section in errors."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = set(settings) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known settings: {sorted(fields)}")
    hints = typing.get_type_hints(params_cls)
    values = {}
    for key, value in settings.items():
        values[key] = _check_type(value, hints[key], f"{where}: {key}")
    if isinstance(values.get("rules"), dict):
        # Rule switches merge into the defaults: naming one rule does not switch the others off.
        default = _field_default(fields["rules"])
        values["rules"] = {**default, **values["rules"]}
    return params_cls(**values)


def _field_default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # e.g. ``int | list[int]``: the first form that fits
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {' or '.join(_describe(o) for o in typing.get_args(hint))}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        value = [_check_type(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        _, item_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        value = {str(k): _check_type(v, item_hint, f"{where}.{k}") for k, v in value.items()}
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))
