"""EasyCache: training-free, runtime-adaptive caching for video diffusion transformers (arXiv 2507.02860).

The public names below are imported on first use (PEP 562), so that `import easycache.cli` or
`easycache.checks` does not import torch: the sample scripts parse and check their flags before any heavy
import.
"""

import importlib

_PUBLIC = {
    "EasyCache": ".cache",
    "EasyCacheConfig": ".cache",
    "StaticCache": ".baselines",
    "StaticCacheConfig": ".baselines",
    "StepCache": ".base",
    "MagCache": ".magcache",
    "MagCacheConfig": ".magcache",
    "PAB": ".pab",
    "PABConfig": ".pab",
    "TeaCache": ".teacache",
    "TeaCacheConfig": ".teacache",
    "add_cache_args": ".cli",
    "cache_config": ".cli",
    "make_cache": ".cli",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'easycache' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
