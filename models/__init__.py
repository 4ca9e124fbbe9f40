"""Minimal, self-contained DiTs for Wan2.1, HunyuanVideo and OpenSora 1.2 that load the official checkpoints.

No caching code lives here: the models are pure functions of their inputs; the cache sits in the sampling
loop of each sample script.
"""
