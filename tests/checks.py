"""Assertions shared by the sample-script tests (one per property that every script must have)."""

import os

import pytest


def assert_identical_comparison(report: dict, nfe: int) -> None:
    """`--compare --thresh 0`: the cache computes every step, so the pair is identical (infinite PSNR in both
    conventions, SSIM 1, zero latent error), NFE ratio 1 at `nfe` DiT calls a side, and both videos exist."""
    row = report["comparison"]["rows"][0]
    assert row["psnr_global"] == "inf" and row["psnr_per_frame"] == "inf"
    assert row["ssim"] == pytest.approx(1.0)
    assert row["nfe_ratio"] == 1.0 and row["nfe_baseline"] == row["nfe_cached"] == nfe
    assert row["latent_mse"] == 0.0
    for side in ("baseline", "cached"):
        assert os.path.isfile(row["outputs"][side]["video"])
