"""Shared fixtures: the real tokenizer of the default model and tiny random models built on it."""

from __future__ import annotations

import pytest
import torch

from dapo.models import load_tokenizer
from toy_run import tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture()
def tiny(tokenizer):
    torch.set_num_threads(2)
    return tiny_model(len(tokenizer), seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    """The tiny model saved as a Hugging Face directory, for `--model DIR`."""
    from toy_run import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer)
