"""Shared fixtures: the real tokenizer of the default model and tiny random models built on it."""

from __future__ import annotations

import pytest
import torch

from dapo.models import load_tokenizer, tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture()
def tiny(tokenizer):
    torch.set_num_threads(2)
    return tiny_model(len(tokenizer), seed=0)
