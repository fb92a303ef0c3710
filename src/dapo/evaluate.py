"""Evaluation: avg@k and pass@k over k sampled answers per held-out prompt, and `dapo eval`.

avg@k is the mean correctness over all k samples of all prompts (the paper's avg@32 at
temperature 1.0, top-p 0.7); pass@k is the share of prompts with at least one correct sample
(the unbiased estimator with n = k). A sample is correct when the accuracy function scores it
>= 1. Records with a "level" column are also summarised per level.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dapo.checkpoint import latest_checkpoint
from dapo.data import Record, encode_prompt
from dapo.errors import DataError, ModelLoadError
from dapo.models import stop_token_ids
from dapo.rewards import RewardFn, RewardFunction, TrainerState, score_group
from dapo.rollout import generate

if TYPE_CHECKING:
    from dapo.config import DAPOConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): 1 - C(n - c, k) / C(n, k) for n samples of
    which c are correct."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct: Sequence[int], n: int, lengths: Sequence[int], k: int | None = None) -> dict[str, float]:
    """avg@n, pass@k (k defaults to n) and mean length from per-prompt correct counts out of n samples."""
    k = n if k is None else k
    m = len(correct)
    return {
        f"avg@{n}": sum(correct) / (m * n),
        f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / m,
        "response_length": sum(lengths) / max(len(lengths), 1),
        "num_prompts": float(m),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    accuracy: RewardFn | RewardFunction,
    *,
    k: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 4,
    max_prompt_len: int = 1024,
    system_prompt: str | None = None,
    reward_timeout: float = 0.0,
    reward_errors: str = "raise",
    trainer_state: TrainerState | None = None,
) -> dict[str, float]:
    """Sample k answers per record and score them with `accuracy` (score >= 1 is correct; None,
    "does not apply", is not). Errors name the function by its own name, or the RewardFunction's.

    Returns avg@k, pass@k, response_length (mean tokens) and num_prompts, and the same as
    "<level>/avg@k" etc. for each value of a "level" column. Greedy decoding (temperature 0)
    samples once per prompt, so k becomes 1.
    """
    if not records:
        raise DataError("the evaluation dataset is empty")
    was_training = model.training
    model.eval()
    k = 1 if temperature == 0 else k
    eos = stop_token_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, r["prompt"], system_prompt, max_prompt_len) for r in records]
    outs = generate(model, prompts, k, max_new_tokens, eos, tokenizer.pad_token_id, temperature, top_p)
    model.train(was_training)
    judge = [accuracy if isinstance(accuracy, RewardFunction) else RewardFunction(accuracy)]
    correct: list[int] = []
    lengths: list[list[int]] = []
    for record, (responses, _) in zip(records, outs):
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = score_group(judge, record, texts, timeout=reward_timeout, on_error=reward_errors,
                             completion_ids=responses, trainer_state=trainer_state).scores[:, 0]
        correct.append(int((scores >= 1.0).sum()))
        lengths.append([len(r) for r in responses])
    out = summarize(correct, k, [n for ls in lengths for n in ls])
    levels = sorted({str(r["level"]) for r in records if "level" in r})
    for level in levels:
        idx = [i for i, r in enumerate(records) if str(r.get("level")) == level]
        part = summarize([correct[i] for i in idx], k, [n for i in idx for n in lengths[i]])
        out.update({f"{level}/{key}": v for key, v in part.items()})
    return out


def format_table(scores: dict[str, float], title: str | None = None) -> str:
    """Rows: all prompts, then each level; columns: prompts, avg@k, pass@k, mean length."""
    avg_key = next((key for key in scores if key.startswith("avg@")), None)
    pass_key = next((key for key in scores if key.startswith("pass@")), None)
    if avg_key is None or pass_key is None:
        return "(no evaluation)"
    subsets = [""] + sorted({key.split("/")[0] + "/" for key in scores if "/" in key})
    header = f"{'subset':<10} {'prompts':>7} {avg_key:>9} {pass_key:>9} {'mean length':>12}"
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for s in subsets:
        lines.append(f"{(s.rstrip('/') or 'all'):<10} {int(scores[s + 'num_prompts']):>7} {scores[s + avg_key]:>9.4f} "
                     f"{scores[s + pass_key]:>9.4f} {scores[s + 'response_length']:>12.2f}")
    return "\n".join(lines)


# --- `dapo eval` ---------------------------------------------------------------------------------

def resolve_model(name: str) -> tuple[str, Path | None]:
    """A model id or directory as it is; a run directory becomes its newest complete checkpoint.

    Returns (model path or id, the checkpoint's saved dapo_config.yaml or None).
    """
    path = Path(name).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ModelLoadError(f"run directory {name!r} has no complete checkpoint under checkpoints/")
        path = ckpt
    saved = path / "dapo_config.yaml"
    return (str(path), saved) if path.is_dir() and saved.is_file() else (name, None)


def eval_config(overrides: dict[str, Any], config_file: str | None = None) -> "DAPOConfig":
    """The config of `dapo eval`: a checkpoint's saved config (when --model is a run or checkpoint
    directory), then --config, then command-line options. `--data` names the evaluation set."""
    import yaml

    from dapo.config import DAPOConfig

    values: dict[str, Any] = {}
    model, saved = resolve_model(str(overrides.get("model", "default")))
    if saved is not None:
        values.update(yaml.safe_load(saved.read_text()) or {})
        values.pop("output_dir", None)
    if config_file:
        values.update(DAPOConfig.from_yaml(config_file).to_dict())
    values.update(overrides)
    values["model"] = model
    if overrides.get("data") is not None:
        values["eval_data"] = overrides["data"]
        values["eval_split"] = overrides.get("eval_split", overrides.get("data_split", "test"))
        if not values.get("reward"):
            raise DataError("dapo eval --data needs --reward: the first reward function judges correctness "
                            "(a score >= 1), e.g. --reward exact_match, numeric, math or file.py:function")
    elif values.get("data") is not None and values.get("eval_data") is None:
        raise DataError(f"the model was trained on --data {values['data']!r} without --eval-data; name the "
                        f"evaluation set with --data test.jsonl")
    values["data"] = None  # evaluation never reads the training set
    return DAPOConfig.from_dict(values, source="dapo eval")


def evaluate_config(config: "DAPOConfig") -> dict[str, float]:
    """Load the config's model and evaluate it on the task's held-out records."""
    from dapo.models import load_model, load_tokenizer, pick_device
    from dapo.tasks import build_task

    c = config
    torch.manual_seed(c.seed)
    torch.set_num_threads(c.threads or os.cpu_count() or 1)
    task = build_task(c, eval_only=True)
    if task.accuracy is None or not task.eval:
        raise DataError("nothing to evaluate: give --data test.jsonl (with --reward) or a built-in --task")
    tokenizer = load_tokenizer(c.model)
    model = load_model(c.model, c.dtype, pick_device(c.device))
    records = task.eval[: c.max_eval_prompts or None]
    return evaluate(model, tokenizer, records, task.accuracy, k=c.eval_samples, temperature=c.eval_temperature,
                    top_p=c.eval_top_p, max_new_tokens=c.max_new_tokens, max_prompt_len=c.max_prompt_len,
                    system_prompt=c.system_prompt, reward_timeout=c.reward_timeout, reward_errors=c.reward_errors)
