import pytest

from dapo import DAPOConfig
from dapo.cli import build_parser, config_from_args, main
from dapo.errors import ConfigError


def test_defaults_are_the_seed_example():
    c = DAPOConfig()
    assert (c.task, c.train_steps, c.grad_steps_per_train_step, c.max_new_tokens) == ("digit", 12, 2, 4)
    assert (c.eps_low, c.eps_high, c.kl_coef, c.loss_agg) == (0.2, 0.28, 0.0, "token-mean")


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"eps_low": 1.5}, "eps_low must be <= 1"),
    ({"clip_ratio_c": 3.0, "policy_loss": "gspo"}, "clip_ratio_c (dual clip) applies to policy_loss 'vanilla' only"),
    ({"sapo_tau_neg": 0}, "sapo_tau_neg must be > 0"),
    ({"clip_cov_lb": 5.0}, "clip_cov_lb (5.0) must be below clip_cov_ub (5.0)"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"loss_agg": "mean"}, "loss_agg must be one of"),
    ({"train_steps": "many"}, "train_steps must be an integer"),
    ({"overlong_buffer_len": 8, "max_new_tokens": 8}, "overlong_buffer_len (8) must be smaller"),
    ({"task": "chess"}, "task must be one of"),
    ({"clip_ratio_c": 0.5}, "clip_ratio_c must be > 1"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DAPOConfig(**kwargs)


def test_each_policy_loss_takes_its_papers_settings():
    """CISPO's weight floor and GMPO's log-ratio floor may exceed 1; the presets in configs/ load."""
    from pathlib import Path

    assert DAPOConfig(policy_loss="cispo", eps_low=10.0).eps_low == 10.0
    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("gspo", "cispo", "sapo", "clip_cov", "kl_cov", "geo_mean"):
        config = DAPOConfig.from_yaml(configs / f"{name}.yaml")
        assert config.policy_loss == name
    assert DAPOConfig.from_yaml(configs / "gspo.yaml").loss_agg == "seq-mean-token-mean"
    assert DAPOConfig(policy_loss="kl_cov").loss_options == {"kl_cov_ratio": 2e-3, "kl_cov_coef": 1.0}


def test_unknown_key_suggests_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_sise: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'group_sise'.*did you mean 'group_size'"):
        DAPOConfig.from_yaml(path)


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_size: 8\nlr: 1.0e-6\neps_high: 0.3\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "2e-6", "--no-overlong-filter"])
    c = config_from_args(args)
    assert (c.group_size, c.lr, c.eps_high, c.overlong_filter) == (8, 2e-6, 0.3, False)


def test_round_trip(tmp_path):
    c = DAPOConfig(group_size=8, reward=["a.py:f"], reward_weights=[0.5])
    c.to_yaml(tmp_path / "c.yaml")
    assert DAPOConfig.from_yaml(tmp_path / "c.yaml") == c


def test_cli_reports_bad_value_without_traceback(capsys):
    assert main(["train", "--eps-high", "-1"]) == 2
    err = capsys.readouterr().err
    assert "eps_high must be in [0, 100], got -1.0" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "eval", "plot"])
def test_help_lists_every_option(command, capsys):
    # A help text with a bare "%" (e.g. "95% lower bound") made argparse raise instead of printing help.
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    if command == "train":
        assert "--solved-accuracy" in out and "95% lower confidence bound" in out


def test_cli_missing_model_path(capsys, tmp_path):
    assert main(["train", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "run")]) == 2
    assert "model path" in capsys.readouterr().err


def test_readme_documents_every_field():
    from dataclasses import fields
    from pathlib import Path

    from dapo.config import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f.name for f in fields(DAPOConfig) if f"| `{f.name}` |" not in readme]
    assert not missing, f"README config table lacks {missing}; regenerate it with dapo.config.markdown_table()"
    assert markdown_table() in readme, "README config table is out of date: regenerate it with markdown_table()"
