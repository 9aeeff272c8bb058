"""The config loader and the ``occ`` command: bad input is named, exits non-zero, and writes nothing."""

import json
import subprocess
import sys

import pytest
from rl_fixtures import make_checkpoint

from occ_theory.cli import main
from occ_theory.train.config import load_config


def test_defaults_load_and_overrides_apply():
    cfg = load_config(None, ["rl.regime=off", "rl.mtp_coef=1e-3", "diag.at=[3,5]", "task.suites=[addition]"])
    assert cfg.rl.regime == "off" and cfg.rl.mtp_coef == 1e-3 and cfg.diag.at == (3, 5)
    assert cfg.task.suites == ("addition",)
    assert cfg.rl.minibatch_size == cfg.rl.batch_size // cfg.rl.minibatches


@pytest.mark.parametrize(("override", "named"), [
    ("rl.minibatchez=3", "rl.minibatchez"),
    ("rl.regime=magic", "rl.regime"),
    ("rl.minibatches=3", "rl.minibatches"),
    ("rl.group_size=1", "rl.group_size"),
    ("rl.lr=-1", "rl.lr"),
    ("rl.top_p=1.5", "rl.top_p"),
    ("rl.coef_clip=[1,0]", "rl.coef_clip"),
    ("diag.dtype=float16", "diag.dtype"),
    ("task.suites=[addition,algebra]", "task.suites"),
    ("model.hidden_size=30", "hidden_size"),
    ("sft.steps=ten", "sft.steps"),
    ("bogus=1", "bogus"),
])
def test_invalid_settings_are_rejected_naming_the_key(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml"):
        load_config(bad)
    off = tmp_path / "off.yaml"
    off.write_text("rl:\n  regime: off\n")  # YAML reads a bare off as false
    with pytest.raises(ValueError, match="quote it"):
        load_config(off)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_occ_help_runs():
    out = subprocess.run([sys.executable, "-m", "occ_theory.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("sft", "rl", "probe", "eval", "figures", "quickstart", "bench"):
        assert cmd in out.stdout


def test_cli_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rl", "--config", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["sft", "--set", "sft.stepz=3", "--out", str(out)]) == 2
    assert "sft.stepz" in capsys.readouterr().err
    assert main(["rl", "--set", "rl.steps=1", "--out", str(out)]) == 2  # no --init
    assert "rl.init" in capsys.readouterr().err
    assert main(["rl", "--init", str(tmp_path / "no_ckpt"), "--out", str(out)]) == 2
    assert "no_ckpt" in capsys.readouterr().err
    assert main(["probe", str(tmp_path)]) == 2
    assert main(["probe", str(tmp_path), "--set", "diag.grid_cap=1", "--out", "../escape.parquet"]) == 2
    assert main(["eval", str(tmp_path / "no_ckpt")]) == 2
    assert not out.exists() or not any(p.name == "metrics.jsonl" for p in out.rglob("*"))


def test_occ_eval_writes_json_and_a_table(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ck")
    dest = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--set", "eval.size=3", "--set", "eval.samples=1", "--set",
                 "eval.max_new_tokens=6", "--json", str(dest)]) == 0
    res = json.loads(dest.read_text())
    assert set(res["suites"]) == {"addition", "signed", "multiplication", "linear", "countdown", "length_gen"}
    assert all(0 <= e["greedy_acc"] <= 1 and e["n"] == 3 for e in res["suites"].values())
    assert "greedy pass@1" in capsys.readouterr().out
