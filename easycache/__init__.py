"""EasyCache: training-free, runtime-adaptive caching for video diffusion transformers (arXiv 2507.02860)."""

from .base import StepCache
from .baselines import StaticCache, StaticCacheConfig
from .cache import EasyCache, EasyCacheConfig
from .cli import add_cache_args, cache_config, make_cache

__all__ = [
    "EasyCache",
    "EasyCacheConfig",
    "StaticCache",
    "StaticCacheConfig",
    "StepCache",
    "add_cache_args",
    "cache_config",
    "make_cache",
]
