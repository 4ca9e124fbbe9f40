"""The caching methods by name, and how a command line sets any field of their configs (`--sweep`, flags).

    METHODS["teacache"]                     -> TeaCacheConfig
    parse_value(TeaCacheConfig, "coefficients", "hunyuan-t2v-720p")
    parse_assignment("teacache.rel_l1_thresh=0.1,0.2")  -> ("teacache", "rel_l1_thresh", [0.1, 0.2])

Values are read by the type of the field's default: bool (true/false), int, float, str, a tuple (numbers
joined by ':', e.g. 100:800, or a published table's name), a {branch: ratios} dict (a published table's
name or a calibration JSON written by `python -m easycache.calibrate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from .checks import BadFile
from .configs import (
    COEFFICIENTS,
    PAB_OPENSORA,
    EasyCacheConfig,
    MagCacheConfig,
    PABConfig,
    StaticCacheConfig,
    TeaCacheConfig,
)
from .published import MAG_RATIOS

METHODS = {
    "easycache": EasyCacheConfig,
    "static": StaticCacheConfig,
    "teacache": TeaCacheConfig,
    "pab": PABConfig,
    "magcache": MagCacheConfig,
}
PAB_PRESETS = {"diffusers": PABConfig(), "opensora": PAB_OPENSORA}


def field_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS[method])]


def _default(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parse_value(cls, name: str, text: str):
    """The value of field `name` of config class `cls` written as `text` on a command line."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{cls.__name__} has no field {name!r} (fields: {known})")
    default, text = _default(cls, name), text.strip()
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{cls.__name__}.{name} takes true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, dict):  # MagCache ratios: a published table or a calibration file
        return _mag_ratios(text)
    if isinstance(default, tuple):
        if name == "coefficients" and not _is_numbers(text):
            return _coefficients(text)
        try:
            return tuple(float(v) for v in text.split(":"))
        except ValueError:
            raise ValueError(f"{cls.__name__}.{name} takes numbers joined by ':', got {text!r}") from None
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = type(default).__name__
        raise ValueError(f"{cls.__name__}.{name} takes a {kind}, got {text!r}") from None
    return None if text.lower() == "none" else text  # str fields (and None defaults)


def parse_assignment(text: str) -> tuple[str, str, list]:
    """'METHOD.FIELD=v1,v2,...' -> (method, field, [values])."""
    target, sep, values = text.partition("=")
    method, dot, name = target.strip().partition(".")
    if not sep or not dot or not values.strip():
        raise ValueError(
            f"expected METHOD.FIELD=v1,v2,... (e.g. teacache.rel_l1_thresh=0.1,0.2), got {text!r}"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in {text!r}; one of {', '.join(METHODS)}")
    return method, name, [parse_value(METHODS[method], name, v) for v in values.split(",") if v.strip()]


def _is_numbers(text: str) -> bool:
    try:
        [float(v) for v in text.split(":")]
    except ValueError:
        return False
    return True


def _coefficients(text: str) -> tuple[float, ...]:
    if text in COEFFICIENTS:
        return COEFFICIENTS[text]
    if os.path.isfile(text) or text.endswith(".json"):
        return _numbers(_calibration(text, "teacache", "coefficients"), text, "teacache.coefficients")
    raise ValueError(
        f"TeaCache coefficients {text!r}: not a published set ({', '.join(COEFFICIENTS)}), not numbers "
        "joined by ':' and not a calibration file"
    )


def _mag_ratios(text: str) -> dict[str, tuple[float, ...]]:
    if text in MAG_RATIOS:
        return dict(MAG_RATIOS[text])
    if os.path.isfile(text) or text.endswith(".json"):
        ratios = _calibration(text, "magcache", "mag_ratios")
        if not isinstance(ratios, dict) or not ratios:
            raise BadFile(f"{text}: magcache.mag_ratios must be a {{branch: [ratios]}} object")
        return {b: _numbers(v, text, f"magcache.mag_ratios.{b}") for b, v in ratios.items()}
    raise ValueError(
        f"MagCache ratios {text!r}: not a published table ({', '.join(MAG_RATIOS)}), nor a calibration file"
    )


def _calibration(path: str, method: str, name: str):
    """Field `name` of the `method` section of a calibration file (easycache.calibrate writes them); a
    missing file is FileNotFoundError, a damaged one BadFile (exit status 1 either way)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"calibration file not found: {path} (write one with python -m easycache.calibrate)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)[method][name]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise BadFile(
            f"{path} is not a calibration file with a {method}.{name} entry (easycache.calibrate writes them)"
        ) from None


def _numbers(values, path: str, name: str) -> tuple[float, ...]:
    """A non-empty list of finite numbers from a calibration file."""
    ok = (
        isinstance(values, list)
        and values
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )
    if not ok:
        raise BadFile(f"{path}: {name} must be a non-empty list of finite numbers, got {str(values)[:60]}")
    return tuple(float(v) for v in values)
