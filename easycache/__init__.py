"""EasyCache: training-free, runtime-adaptive caching for video diffusion transformers (arXiv 2507.02860)."""

from .base import StepCache
from .baselines import StaticCache, StaticCacheConfig
from .cache import EasyCache, EasyCacheConfig
from .cli import add_cache_args, cache_config, make_cache
from .magcache import MagCache, MagCacheConfig
from .pab import PAB, PABConfig
from .teacache import TeaCache, TeaCacheConfig

__all__ = [
    "EasyCache",
    "EasyCacheConfig",
    "MagCache",
    "MagCacheConfig",
    "PAB",
    "PABConfig",
    "StaticCache",
    "StaticCacheConfig",
    "StepCache",
    "TeaCache",
    "TeaCacheConfig",
    "add_cache_args",
    "cache_config",
    "make_cache",
]
