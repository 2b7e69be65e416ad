"""Shared fixtures for the compress tests: one torch thread (the test machines are small and
busy; tiny matrices run faster single-threaded) and tiny registered models."""
from __future__ import annotations

import pytest
import torch

import compress  # noqa: F401  (registers vit_cifar_ref with timm)

# A 2-block, 64-wide vit_cifar_ref: a real registered timm model small enough for seconds-long runs.
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_config(tmp_path):
    """A fast pipeline Config on the tiny ViT with 16 real bundled CIFAR-10 images."""
    from compress.pipeline import Config

    def make(**kw):
        args = dict(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False,
                    out=str(tmp_path / "out"), num_calib=16, batch_size=8, ratio=0.3, comp_rank=8,
                    comp_steps=10, stats_cache=None, finetune_steps=0)   # distillation: test_finetune.py
        args.update(kw)
        return Config(**args)
    return make
