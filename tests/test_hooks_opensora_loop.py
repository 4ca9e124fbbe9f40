"""sample_opensora.py's loop with TeaCache, MagCache and PAB on one batched [cond; uncond] call per step."""

import numpy as np
import pytest
import torch

from easycache import MagCacheConfig, PABConfig, TeaCacheConfig
from easycache.published import MAG_RATIOS
from tests.test_sample_opensora import PROMPT, STEPS, _one_thread, ckpt, pipe  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_each_method_at_threshold_zero_is_the_baseline(pipe):  # noqa: F811
    base = pipe.generate(PROMPT, 5, None)
    for cfg in (
        TeaCacheConfig(rel_l1_thresh=0.0, probe="modulated"),
        MagCacheConfig(magcache_thresh=0.0, mag_ratios=MAG_RATIOS["opensora-v1.2"]),
        PABConfig(spatial_broadcast=False),
    ):
        gen = pipe.generate(PROMPT, 5, cfg)
        assert torch.equal(base.latents, gen.latents) and np.array_equal(base.frames, gen.frames), cfg
    skip = pipe.generate(
        PROMPT, 5, TeaCacheConfig(rel_l1_thresh=10.0, probe="modulated", coefficients=(1.0, 0.0))
    )
    s = skip.cache_stats
    assert s["dit_calls"] == STEPS and s["block_calls"] == 2  # first and last step; one call per step
    assert s["work_ratio"] > 1 and not torch.equal(base.latents, skip.latents)
    pab = pipe.generate(PROMPT, 5, PABConfig(spatial_threshold=(0, 1000), cross_broadcast=True, cross_range=2,
                                             cross_threshold=(0, 1000)))  # fmt: skip
    assert pab.cache_stats["work_ratio"] > 1 and pab.cache_stats["attention"]["cross"]["broadcast"] > 0
