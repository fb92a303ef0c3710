"""`dapo ablate`: the ladder's rungs, the report on fabricated runs, and resuming an interrupted ablation."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

import pytest

from dapo import DAPOConfig
from dapo.ablate import arm_configs, load_rungs, paper_ladder, run_ablation, slug, write_report
from dapo.errors import ConfigError, TrainingInterrupted

FULL = DAPOConfig(max_new_tokens=64, overlong_buffer_len=16, overlong_filter=True, eps_low=0.2, eps_high=0.28,
                  loss_agg="token-mean", dynamic_sampling=True)
PER_ARM = {"seed", "output_dir", "max_samples", "eval_before", "verbose", "keep_last"}


def diff(a: DAPOConfig, b: DAPOConfig) -> set[str]:
    x, y = asdict(a), asdict(b)
    return {k for k in x if x[k] != y[k]} - PER_ARM


def test_each_rung_changes_exactly_its_field_and_the_last_is_the_config(tmp_path):
    rungs = paper_ladder(FULL)
    arms = arm_configs(FULL, rungs, [0], 100, tmp_path)
    configs = [c for _, _, _, c in arms]
    assert [r.name for r in rungs] == ["naive GRPO", "+ overlong filtering", "+ clip-higher",
                                       "+ soft overlong punishment", "+ token-level loss", "+ dynamic sampling"]
    naive = configs[0]
    assert (naive.eps_low, naive.eps_high, naive.loss_agg, naive.overlong_filter, naive.overlong_buffer_len,
            naive.dynamic_sampling) == (0.2, 0.2, "seq-mean-token-mean", False, 0, False)
    expected = [{"overlong_filter"}, {"eps_high"}, {"overlong_buffer_len"}, {"loss_agg"}, {"dynamic_sampling"}]
    assert [diff(a, b) for a, b in zip(configs, configs[1:])] == expected
    assert diff(configs[-1], FULL) == set()
    assert {(c.max_samples, c.seed, c.eval_before) for c in configs} == {(100, 0, False)}
    assert configs[2].output_dir == str(tmp_path / "2-clip-higher" / "seed0")


def test_a_rung_that_would_change_nothing_is_refused():
    with pytest.raises(ConfigError, match="'\\+ soft overlong punishment' would change nothing: the config has "
                                          "overlong_buffer_len = 0"):
        paper_ladder(FULL.replace(overlong_buffer_len=0))


def test_user_rungs_from_yaml(tmp_path):
    path = tmp_path / "rungs.yaml"
    path.write_text("- name: base\n  set: {lr: 1.0e-5}\n- name: faster\n  set: {lr: 3.0e-5}\n- name: k\n"
                    "  set: {eps-high: 0.3}\n")
    rungs = load_rungs(path)
    arms = arm_configs(FULL, rungs, [0, 1], 10, tmp_path)
    assert [(i, s, c.lr, c.eps_high) for i, _, s, c in arms] == [(0, 0, 1e-5, 0.28), (1, 0, 3e-5, 0.28),
                                                                (2, 0, 3e-5, 0.3), (0, 1, 1e-5, 0.28),
                                                                (1, 1, 3e-5, 0.28), (2, 1, 3e-5, 0.3)]
    path.write_text("- name: typo\n  set: {eps_hihg: 0.3}\n")
    with pytest.raises(ConfigError, match="rung 1 sets unknown config field\\(s\\) eps_hihg"):
        load_rungs(path)


def fabricate(out: Path) -> None:
    """Two rungs x two seeds with hand-made curves."""
    rungs = [{"name": "naive GRPO", "changes": {}}, {"name": "+ clip-higher", "changes": {"eps_high": 0.28}}]
    (out / "ablation.json").write_text(json.dumps({"budget_samples": 64, "seeds": [0, 1], "rungs": rungs}))
    (out / "start.json").write_text(json.dumps({"0": {"avg@4": 0.1, "pass@4": 0.3}, "1": {"avg@4": 0.3, "pass@4": 0.5}}))
    accs = {(0, 0): [0.2, 0.25], (0, 1): [0.3, 0.35], (1, 0): [0.3, 0.5], (1, 1): [0.4, 0.6]}
    for (i, seed), (mid, end) in accs.items():
        d = out / slug(i, rungs[i]["name"]) / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "arm.json").write_text(json.dumps({"rung": i, "seed": seed}))
        (d / "eval.jsonl").write_text(f'{{"step": 2, "avg@4": {mid}, "pass@4": 0.5}}\n'
                                      f'{{"step": 4, "avg@4": {end}, "pass@4": 0.75}}\n')
        rows = [{"step": s, "step_seconds": 10.0 * (i + 1), "entropy": 1.0 + s, "response_length_mean": 100.0 - s,
                 "truncated_share": 0.5 - 0.1 * s} for s in range(1, 5)]
        # a resume from step 2's checkpoint re-ran steps 3 and 4: their first rows are superseded
        rows[2:2] = [{**r, "step_seconds": 999.0, "entropy": 99.0} for r in rows[2:]]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_table_and_figure_from_fabricated_runs(tmp_path):
    fabricate(tmp_path)
    report = write_report(tmp_path)
    lines = report.read_text().splitlines()
    # threshold: mean start (0.1 + 0.3) / 2 + 0.1 = 0.3
    assert "until avg@4 >= 0.3" in lines[0]
    start, naive, clip = lines[-3:]
    assert start.startswith("| start | the untrained model | 0.200 ± 0.141 | 0.400 ± 0.141 |")
    cells = [c.strip() for c in naive.split("|")[1:-1]]
    # end 0.25/0.35; best = end; 4 steps; seed 0 never reaches 0.3 (1/2), seed 1 at step 2 after 2 x 10 s;
    # the last quarter of 4 steps is step 4: length 96, truncated 0.1, entropy 5
    assert cells == ["naive GRPO", "", "0.300 ± 0.071", "0.750 ± 0.000", "0.300 ± 0.071", "4.000 ± 0.000",
                     "2.000 (1/2)", "20.000", "96.000 ± 0.000", "0.100 ± 0.000", "5.000 ± 0.000"]
    cells = [c.strip() for c in clip.split("|")[1:-1]]
    assert cells[1] == "eps_high=0.28" and cells[2] == "0.550 ± 0.071" and cells[6] == "2.000 ± 0.000"
    assert cells[7] == "40.000 ± 0.000"  # two steps of 20 s
    from dapo.cli import main
    assert main(["ablate", "--out", str(tmp_path), "--report-only", "--threshold", "0.5"]) == 0
    assert "until avg@4 >= 0.5" in report.read_text()
    assert main(["ablate", "--out", str(tmp_path)]) == 2  # no --budget: one line names it
    png = tmp_path / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_an_interrupted_ablation_resumes_where_it_stopped(tiny_dir, tmp_path, monkeypatch):
    import dapo.actor
    import dapo.trainer

    config = DAPOConfig(model=str(tiny_dir), task="digit", group_size=2, train_batch_size=1, gen_batch_size=1,
                        dynamic_sampling=False, max_new_tokens=2, mu=1, train_steps=50, eval_samples=2, eval_every=2, threads=1,
                        verbose=False, save_every=1, lr=1e-3)
    rungs = [r for r in load_rungs_text(tmp_path, "- name: a\n  set: {}\n- name: b\n  set: {eps_high: 0.3}\n")]
    update, calls = dapo.actor.Actor.update, {"n": 0}

    def update_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # arm b's second train step (arm a: 4 steps of 2 samples, the budget of 8)
            os.kill(os.getpid(), signal.SIGTERM)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(dapo.actor.Actor, "update", update_then_signal)
    with pytest.raises(TrainingInterrupted):
        run_ablation(config, rungs, [0], 8, tmp_path / "abl", log=lambda _: None)
    arm_a, arm_b = tmp_path / "abl" / "0-a" / "seed0", tmp_path / "abl" / "1-b" / "seed0"
    assert (arm_a / "arm.json").exists() and not (arm_b / "arm.json").exists()
    assert (arm_b / "checkpoints" / "step-000002").is_dir()
    a_metrics = (arm_a / "metrics.jsonl").read_text()
    evals = [json.loads(line)["step"] for line in (arm_a / "eval.jsonl").read_text().splitlines()]
    # eval_before is off in the arms (the start is evaluated once, in start.json), and the step that
    # spends the budget is evaluated once, as the final evaluation
    assert evals == [2, 4]
    assert set(json.loads((tmp_path / "abl" / "start.json").read_text())) == {"0"}

    trained = []
    train = dapo.trainer.train
    monkeypatch.setattr(dapo.trainer, "train", lambda c, **kw: trained.append((c.output_dir, kw)) or train(c, **kw))
    report = run_ablation(config, rungs, [0], 8, tmp_path / "abl", log=lambda _: None)
    assert trained == [(str(arm_b), {"resume": arm_b})]  # arm a is not run again; b resumes
    assert (arm_a / "metrics.jsonl").read_text() == a_metrics
    steps = [json.loads(line)["step"] for line in (arm_b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # 4 steps of 2 samples reach the budget of 8; none repeated
    assert "| a |" in report.read_text() and "| b | eps_high=0.3 |" in report.read_text()
    with pytest.raises(ConfigError, match="holds an ablation with another budget"):
        run_ablation(config, rungs, [0], 16, tmp_path / "abl", log=lambda _: None)


def load_rungs_text(tmp_path: Path, text: str):
    path = tmp_path / "rungs.yaml"
    path.write_text(text)
    return load_rungs(path)
