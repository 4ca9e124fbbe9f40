"""sample_hunyuan.py's loop with TeaCache, MagCache and PAB (the cfg-distilled model: one "cond" call)."""

import numpy as np
import pytest
import torch

from easycache import MagCacheConfig, PABConfig, TeaCacheConfig
from tests.test_sample_hunyuan import PROMPT, model_base, one_thread, pipe  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_each_method_at_threshold_zero_is_the_baseline(pipe):  # noqa: F811
    base = pipe.generate(PROMPT, 5, None)
    for cfg in (
        TeaCacheConfig(rel_l1_thresh=0.0, probe="modulated"),
        MagCacheConfig(magcache_thresh=0.0, mag_ratios={"cond": (1.0,) * 50}, branches="cond"),
        PABConfig(spatial_broadcast=False),
    ):
        gen = pipe.generate(PROMPT, 5, cfg)
        assert torch.equal(base.latents, gen.latents) and np.array_equal(base.frames, gen.frames), cfg
    skip = pipe.generate(
        PROMPT, 5, TeaCacheConfig(rel_l1_thresh=10.0, probe="modulated", coefficients=(1.0, 0.0))
    )
    assert skip.cache_stats["block_calls"] == 2 and skip.cache_stats["work_ratio"] > 1
    assert not torch.equal(base.latents, skip.latents)
    pab = pipe.generate(PROMPT, 5, PABConfig(spatial_threshold=(0, 1000)))
    assert pab.cache_stats["work_ratio"] > 1 and pab.cache_stats["attention"]["spatial"]["broadcast"] > 0
