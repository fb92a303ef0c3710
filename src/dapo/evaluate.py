"""Evaluation: avg@k and pass@k over k sampled answers per held-out prompt, and `dapo eval`.

avg@k is the mean correctness over all k samples of all prompts (the paper's avg@32 at
temperature 1.0, top-p 0.7); pass@k is the share of prompts with at least one correct sample
(the unbiased estimator with n = k). A sample is correct when the accuracy function scores it
>= 1. Records with a "level" column are also summarised per level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dapo.checkpoint import intact_checkpoint, list_checkpoints, verify_checkpoint
from dapo.data import Record, encode_prompt
from dapo.engines import RolloutEngine, SamplingParams
from dapo.errors import DataError, ModelLoadError, oom_guard
from dapo.models import stop_token_ids
from dapo.progress import once, stderr_warning
from dapo.rewards import BUILTIN_REWARDS, RewardFn, RewardFunction, TrainerState, reward_name
from dapo.rollout import HFEngine
from dapo.scorer import RewardScorer

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
    engine: RolloutEngine | torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Record],
    judge: RewardScorer | RewardFn | RewardFunction,
    *,
    k: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 4,
    max_prompt_len: int = 1024,
    system_prompt: str | None = None,
    reward_timeout: float = 0.0,
    reward_errors: str = "raise",
    stop_ids: Sequence[int] | None = None,
    trainer_state: TrainerState | None = None,
    warn: Callable[[str], None] = stderr_warning,
) -> dict[str, float]:
    """Sample k answers per record with `engine` (or a model, sampled by an HFEngine) and judge
    them with the scorer's accuracy function (or a TRL-style function): a score >= 1 is correct
    (None, "does not apply", is not). Errors name the function by its own name.

    Returns avg@k, pass@k, response_length (mean tokens) and num_prompts, and the same as
    "<level>/avg@k" etc. for each value of a "level" column. Greedy decoding (temperature 0)
    samples once per prompt, so k becomes 1. `reward_timeout`/`reward_errors` apply when `judge`
    is a function (a scorer brings its own). `stop_ids` default: the tokenizer's EOS and, given a
    model, its generation config's.
    """
    if not records:
        raise DataError("the evaluation dataset is empty")
    eos = stop_ids if stop_ids is not None else stop_token_ids(engine, tokenizer)
    if isinstance(engine, torch.nn.Module):
        engine = HFEngine(engine, tokenizer.pad_token_id)
    k = 1 if temperature == 0 else k
    warn = once(warn)  # a template warning applies to many prompts: say it once
    prompts = [encode_prompt(tokenizer, r["prompt"], system_prompt, max_prompt_len, warn) for r in records]
    outs = engine.generate(prompts, k, SamplingParams(max_new_tokens, temperature, top_p, tuple(sorted(eos))))
    responses = [resp for s in outs for resp in s.response_ids]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    flat_records = [r for r, s in zip(records, outs) for _ in s.response_ids]
    extra = {"completion_ids": responses, "trainer_state": trainer_state}
    if isinstance(judge, RewardScorer):
        hits = judge.judge(flat_records, texts, **extra).correct
    else:
        fn, name = (judge.fn, judge.name) if isinstance(judge, RewardFunction) else (judge, reward_name(judge))
        with RewardScorer([], fn, accuracy_name=name, timeout=reward_timeout, on_error=reward_errors) as scorer:
            hits = scorer.judge(flat_records, texts, **extra).correct
    assert hits is not None
    correct = [int(h.sum()) for h in hits.split([len(s.response_ids) for s in outs])]
    lengths = [[len(r) for r in s.response_ids] for s in outs]
    out = summarize(correct, k, [n for ls in lengths for n in ls])
    levels = sorted({str(r["level"]) for r in records if "level" in r})
    for level in levels:
        idx = [i for i, r in enumerate(records) if str(r.get("level")) == level]
        part = summarize([correct[i] for i in idx], k, [n for i in idx for n in lengths[i]])
        out.update({f"{level}/{key}": v for key, v in part.items()})
    return out


class Evaluator:
    """Held-out avg@k / pass@k of the policy an engine samples from, with a config's evaluation
    settings (eval_samples, eval_temperature, eval_top_p, max_eval_prompts, ...): the one object
    behind `dapo eval` and the evaluations inside a run (build.py makes both)."""

    def __init__(self, config: "DAPOConfig", engine: RolloutEngine, tokenizer: Any, records: Sequence[Record],
                 scorer: RewardScorer, stop_ids: Sequence[int], warn: Callable[[str], None] = stderr_warning) -> None:
        self.config, self.engine, self.tokenizer, self.scorer, self.warn = config, engine, tokenizer, scorer, warn
        self.records = list(records[: config.max_eval_prompts or None])
        self.stop_ids = sorted(stop_ids)

    def __call__(self, trainer_state: TrainerState | None = None) -> dict[str, float]:
        """Evaluate now, on a copy of the RNG state: how often and how much a run evaluates must not
        change its training samples (so eval settings are safe to change on resume)."""
        c = self.config
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), oom_guard("evaluation", c):
            return evaluate(self.engine, self.tokenizer, self.records, self.scorer, k=c.eval_samples,
                            temperature=c.eval_temperature, top_p=c.eval_top_p, max_new_tokens=c.max_new_tokens,
                            max_prompt_len=c.max_prompt_len, system_prompt=c.system_prompt, stop_ids=self.stop_ids,
                            trainer_state=trainer_state, warn=self.warn)


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
    """A model id or directory as it is; a run directory becomes its newest intact checkpoint
    (a damaged newer one is skipped with a warning; checkpoint.verify_checkpoint); a checkpoint
    directory named directly must be intact.

    Returns (model path or id, the checkpoint's saved dapo_config.yaml or None).
    """
    path = Path(name).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        if not list_checkpoints(path):
            raise ModelLoadError(f"run directory {name!r} has no complete checkpoint under checkpoints/")
        ckpt = intact_checkpoint(path, need_state=False, what="evaluating")
        if ckpt is None:
            raise ModelLoadError(f"every checkpoint of run directory {name!r} is damaged (see the warnings above)")
        path = ckpt
    elif path.is_dir() and (path / "COMPLETE").is_file():
        problem = verify_checkpoint(path, need_state=False)
        if problem is not None:
            raise ModelLoadError(f"checkpoint {name!r} is damaged: {problem}")
    saved = path / "dapo_config.yaml"
    return (str(path), saved) if path.is_dir() and saved.is_file() else (name, None)


def eval_config(overrides: dict[str, Any], config_file: str | None = None,
                trust_run_rewards: bool = False) -> "DAPOConfig":
    """The config of `dapo eval`: a checkpoint's saved config (when --model is a run or checkpoint
    directory), then --config, then command-line options. `--data` names the evaluation set.

    A run directory is data, not code: of the saved config's reward functions only built-in names
    are kept; file and module rewards are imported only when given again with --reward or when
    `trust_run_rewards` (--trust-run-rewards) says the run directory is trusted."""
    from dapo.config import DAPOConfig, read_yaml_values

    values: dict[str, Any] = {}
    model, saved = resolve_model(str(overrides.get("model", "default")))
    if saved is not None:
        values.update(read_yaml_values(saved))
        values.pop("output_dir", None)
        values.pop("overwrite", None)
        if not trust_run_rewards and not overrides.get("reward"):
            _drop_untrusted_rewards(values, saved)
    if config_file:
        values.update(DAPOConfig.from_yaml(config_file).to_dict())
    values.update(overrides)
    if overrides.get("reward") and not overrides.get("reward_weights"):
        values["reward_weights"] = []  # the saved weights belong to the saved reward functions
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


def _drop_untrusted_rewards(values: dict[str, Any], saved: Path) -> None:
    """Keep the saved config's built-in rewards; refuse when the judge (the first) is code."""
    specs = [str(s) for s in values.get("reward") or []]
    untrusted = [s for s in specs if s not in BUILTIN_REWARDS]
    if not untrusted:
        return
    if specs[0] in untrusted:
        raise DataError(f"{saved} names reward functions that are code ({', '.join(untrusted)}); dapo eval does not "
                        "import code from a run directory. Pass the judge yourself with --reward (e.g. --reward "
                        f"{specs[0]}) or add --trust-run-rewards if you trust this run directory")
    values["reward"] = [specs[0]]  # the judge alone decides correctness; the other rewards are not needed
    values["reward_weights"] = []
