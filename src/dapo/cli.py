"""Command line: `dapo train`, `dapo eval`, `dapo plot`, `dapo ablate`. Options are generated from DAPOConfig's fields."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from dapo.config import DAPOConfig
from dapo.errors import ConfigError, DapoError, ResumeError, TrainingInterrupted

GROUP_TITLES = {"model": "model", "data": "prompts and rewards", "rollout": "rollout and dynamic sampling",
                "loss": "reward shaping, advantages and loss", "optim": "optimisation",
                "output": "evaluation, logging and output"}


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per config field; values stay None unless given, so YAML values survive."""
    hints = get_type_hints(DAPOConfig)
    groups = {k: parser.add_argument_group(v) for k, v in GROUP_TITLES.items()}
    for f in fields(DAPOConfig):
        hint = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        # argparse expands %-formats in help strings: a literal "95%" must reach it as "95%%"
        help_text = f"{f.metadata['help']} (default: {_default(f)})".replace("%", "%%")
        group = groups[f.metadata["group"]]
        if hint is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(hint) is list:
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="VALUE", help=help_text)
        else:
            choices = [a for a in get_args(hint) if isinstance(a, str)] if "Literal" in str(hint) else None
            group.add_argument(flag, dest=f.name, default=None, choices=choices or None, metavar=None if choices else
                               f.name.upper(), help=help_text)


def config_from_args(args: argparse.Namespace) -> DAPOConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(DAPOConfig) if getattr(args, f.name) is not None}
    if args.config:
        return DAPOConfig.from_yaml(args.config, **overrides)
    return DAPOConfig.from_dict(overrides)


def resumed_config_from_args(args: argparse.Namespace, checkpoint: Any = None) -> DAPOConfig:
    """The resumed run's config: its checkpoint's config, then --config values, then options."""
    from dapo.config import read_yaml_values
    from dapo.resume import resumed_config

    overrides = {k.replace("-", "_"): v for k, v in read_yaml_values(args.config).items()} if args.config else {}
    overrides.update({f.name: getattr(args, f.name) for f in fields(DAPOConfig) if getattr(args, f.name) is not None})
    return resumed_config(args.resume, overrides, checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo", description="Fine-tune language models with DAPO.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model", description="Train with DAPO. Without options: the "
                             "seed's digit example on the embedded SmolLM2-135M-Instruct.")
    p_train.add_argument("--config", help="YAML file of config fields; command-line options override it")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest complete "
                         "checkpoint; options may change only logging, output, evaluation and --train-steps")
    p_train.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p_train.add_argument("--nproc", type=int, metavar="N", help="train on N data-parallel processes of this machine "
                         "(FSDP2): runs this command as N ranks that end together (dapo.launch); see "
                         "docs/distributed.md for several machines")
    add_config_arguments(p_train)
    p_eval = sub.add_parser("eval", help="evaluate a model or run directory", description="Evaluate --model (a "
                            "model id or directory, or a run directory: its newest checkpoint) on --data (with "
                            "--reward) or a built-in --task's held-out prompts; prints avg@k, pass@k, mean length.")
    p_eval.add_argument("--config", help="YAML file of config fields")
    p_eval.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p_eval.add_argument("--trust-run-rewards", action="store_true", help="import the reward functions named in a "
                        "run directory's saved config (files and modules are Python code run on import); without "
                        "it only built-in rewards and those given with --reward are used")
    add_config_arguments(p_eval)
    p_plot = sub.add_parser("plot", help="draw a PNG dashboard of one or more run directories",
                            description="Plot reward, accuracy, length, entropy, clipping, KL, dynamic sampling "
                            "and timing from RUN_DIR/metrics.jsonl; several runs are overlaid.")
    p_plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory written by dapo train")
    p_plot.add_argument("-o", "--output", help="PNG path (default: RUN_DIR/dashboard.png for one run, "
                        "./dashboard.png for several)")
    p_plot.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p_abl = sub.add_parser("ablate", help="run a ladder of configurations (default: the paper's ablation)",
                           description="Run the paper's ablation ladder (naive GRPO, + overlong filtering, + "
                           "clip-higher, + soft overlong punishment, + token-level loss, + dynamic sampling; each "
                           "rung takes its value from the config) or --rungs, each arm with the same budget of "
                           "sampled responses, for every --seeds; then OUT/ablation.md (table) and OUT/ablation.png. "
                           "Run again to resume. See docs/ablation.md.")
    p_abl.add_argument("--config", help="YAML file of config fields: the full DAPO config the ladder climbs to")
    p_abl.add_argument("--rungs", help="YAML list of {name, set: {field: value}}, applied in turn (default: the "
                       "paper's ladder)")
    p_abl.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every rung (default: 0 1)")
    p_abl.add_argument("--budget", type=int, metavar="SAMPLES",
                       help="sampled responses per arm (config max_samples); the same for every arm")
    p_abl.add_argument("--out", required=True, metavar="DIR", help="the ablation's directory: one run per arm")
    p_abl.add_argument("--threshold", type=float, help="held-out accuracy the table counts steps and seconds to "
                       "(default: the starting model's + 0.1)")
    p_abl.add_argument("--report-only", action="store_true", help="only rewrite the table and figure from the "
                       "finished arms")
    p_abl.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    add_config_arguments(p_abl)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from dapo.evaluate import format_table
    from dapo.progress import print_summary, summary_rows
    from dapo.trainer import train

    if args.resume:
        from dapo.resume import find_checkpoint
        from dapo.rundir import acquire_run_lock

        if not Path(args.resume).is_dir():
            raise ResumeError(f"cannot resume: run directory {args.resume} does not exist")
        # Lock first: a second `--resume` of a live run stops here, before it reads or changes anything.
        # The checkpoint is chosen (and verified) once; its config is checked once, here.
        with acquire_run_lock(args.resume):
            checkpoint = find_checkpoint(args.resume)
            config = resumed_config_from_args(args, checkpoint)
            result = train(config, resume=args.resume, checkpoint=checkpoint)
    else:
        config = config_from_args(args)
        result = train(config)
    from dapo import distributed

    if distributed.rank() != 0:  # torchrun: one summary, rank 0's
        return 0
    name = "share of answers that are exactly \"5\"" if config.task == "digit" and config.data is None else "accuracy"
    if result.eval_after:
        avg = next(key for key in result.eval_after if key.startswith("avg@"))  # avg@1 when greedy
        when = (f"{result.eval_before[avg]:.3f} before training, {result.eval_after[avg]:.3f} after"
                if result.eval_before else f"{result.eval_after[avg]:.3f} after training")  # resumed: no "before"
        print(f"-- Evaluation ({avg[4:]} samples at temperature {config.eval_temperature}): {name} {when}")
    if result.eval_before:
        print(format_table(result.eval_before, "-- Held-out evaluation before training"))
        print(format_table(result.eval_after, "-- Held-out evaluation after training"))
    print(f"-- Done in {result.seconds:.1f} s. Checkpoint: {result.checkpoint}")
    print_summary(summary_rows(result.steps, result.seconds, result.metrics, result.eval_before, result.eval_after,
                               result.checkpoint, result.run_dir, result.stopped_sampling))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dapo.build import evaluate_config
    from dapo.evaluate import eval_config, format_table

    overrides = {f.name: getattr(args, f.name) for f in fields(DAPOConfig) if getattr(args, f.name) is not None}
    config = eval_config(overrides, args.config, trust_run_rewards=args.trust_run_rewards)
    scores = evaluate_config(config)
    mode = "greedy" if config.eval_temperature == 0 else f"temperature {config.eval_temperature}, top-p {config.eval_top_p}"
    print(format_table(scores, f"-- {config.model}: {int(scores['num_prompts'])} prompts, {mode}"))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dapo.plot import plot_runs

    print(f"Wrote {plot_runs(args.run_dirs, args.output)}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from dapo.ablate import load_rungs, paper_ladder, run_ablation, write_report

    out = Path(args.out)
    if args.report_only:
        print(f"Wrote {write_report(out, args.threshold)}")
        return 0
    if args.budget is None or args.budget < 1:
        raise ConfigError("dapo ablate needs --budget SAMPLES (>= 1): the sampled responses every arm gets")
    config = config_from_args(args)
    rungs = load_rungs(args.rungs) if args.rungs else paper_ladder(config)
    try:
        report = run_ablation(config, rungs, args.seeds, args.budget, out)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"ablation interrupted ({e}); the same `dapo ablate` command resumes it",
                                  e.signum) from None
    if args.threshold is not None:
        report = write_report(out, args.threshold)
    print(report.read_text(), end="")
    print(f"Wrote {report} and {out / 'ablation.png'}")
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_ranks(nproc: int, argv: list[str], run_dir: str | None) -> int:
    """Run this `dapo train` (`argv` less --nproc) on `nproc` ranks of this machine (dapo.launch):
    if one rank dies the others are stopped, and one line names the checkpoint to resume from."""
    from dapo import launch

    return launch.launch(nproc, without_nproc(argv), run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "train" and args.nproc is not None:
        if args.nproc < 1:
            parser.error("--nproc must be at least 1")
        if "WORLD_SIZE" in os.environ:
            parser.error("--nproc is for a plain `dapo train`; under torchrun the launcher sets the processes")
        if args.nproc > 1:
            return launch_ranks(args.nproc, argv, args.resume or args.output_dir)
    try:
        return {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "ablate": cmd_ablate}[args.command](args)
    except TrainingInterrupted as e:
        from dapo import distributed

        if distributed.rank() == 0:  # every rank stopped at the same step: one line says so
            print(f"dapo: {e}", file=sys.stderr)
        return e.exit_code
    except DapoError as e:
        if args.debug:
            raise
        print(f"dapo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a file vanishing: the OS's own words are clear enough
        if args.debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"dapo: error: {e.strerror or e}{where} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dapo: interrupted", file=sys.stderr)
        return 130
    finally:
        from dapo import distributed

        distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())
