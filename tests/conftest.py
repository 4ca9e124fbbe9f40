"""Test setup: offline, CPU, deterministic. No test may reach a model hub."""

import os
import tempfile

# Set before anything imports huggingface_hub/transformers/diffusers: a hub id must fail fast, never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="easycache-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
