"""The config loader, the probe settings and the ``occ`` command: bad input is named (the full key),
exits non-zero, and writes nothing; configs round-trip and are found by name from any directory."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rl_fixtures import make_checkpoint

from occ_theory import names
from occ_theory.cli import main
from occ_theory.diagnostics.settings import ProbeFields, ProbeSettings
from occ_theory.models import ModelConfig
from occ_theory.train.config import PACKAGED_CONFIGS, Config, dump_config, load_config


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
    ("model.hidden_size=30", "model"),  # ModelConfig's own check: "hidden_size=30 is not divisible by ..."
    ("sft.steps=ten", "sft.steps"),
    ("sft.steps=3.0", "sft.steps"),
    ("diag.first=1", "diag.first"),
    ("rl.lr=true", "rl.lr"),
    ("rl.betas=[0.9,1]", "rl.betas[1]"),
    ("diag.at=[0]", "diag.at[0]"),
    ("task.weights=[1,-1,1,1,1]", "task.weights[1]"),
    ("diag.curve_points=2", "diag.curve_points"),
    ("diag.seed=3", "diag.seed"),
    ("model.hiden_size=3", "model.hiden_size"),
    ("model.rope_theta=inf", "model.rope_theta"),
    ("bogus=1", "bogus"),
])
def test_invalid_settings_are_rejected_naming_the_key(override, named):
    with pytest.raises(ValueError, match=rf"^config key '{re.escape(named)}': ") as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


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
    for cmd in ("sft", "rl", "probe", "eval", "figures", "cost", "quickstart", "bench"):
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
    assert main(["probe", str(tmp_path), "--set", "diag.grid_cap=1", "--probes", "../escape.parquet"]) == 2
    assert main(["eval", str(tmp_path / "no_ckpt")]) == 2
    assert main(["cost", str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["cost", str(tmp_path), "--rounds", "5"]) == 2
    assert "--rounds must be >= 6" in capsys.readouterr().err
    assert main(["cost", str(tmp_path), "--json", str(tmp_path)]) == 2  # a directory: refused before any timing
    assert "is a directory" in capsys.readouterr().err
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


# ---------------------------------------------------------------- the config layer (pydantic)

SECTIONS = ("task", "sft", "rl", "diag", "eval")


def _float_keys() -> list[str]:
    """Every float-valued config key (scalar or optional scalar), read off the models."""
    keys = []
    for sec in SECTIONS:
        for name, f in Config.model_fields[sec].annotation.model_fields.items():
            if f.annotation in (float, float | None):
                keys.append(f"{sec}.{name}")
    return [*keys, "model.rms_norm_eps", "model.rope_theta"]


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["inf", "-.inf", "nan"])
def test_non_finite_values_are_refused_for_every_float_key(key, value):
    with pytest.raises(ValueError, match=rf"^config key '{re.escape(key)}': .*finite"):
        load_config(None, [f"{key}={value}"])


def test_the_float_keys_include_the_reported_ones():
    assert {"sft.lr", "sft.mtp_coef", "rl.lr", "rl.temperature", "rl.mtp_coef", "diag.curve_span"} <= set(_float_keys())


def test_non_finite_inside_a_list_is_refused_naming_the_item(tmp_path):
    with pytest.raises(ValueError, match=r"^config key 'rl\.coef_clip\[1\]': .*finite"):
        load_config(None, ["rl.coef_clip=[0,.inf]"])
    f = tmp_path / "c.yaml"
    f.write_text("task:\n  weights: [1, 1, 1, 1, .nan]\n")
    with pytest.raises(ValueError, match=r"^config key 'task\.weights\[4\]'"):
        load_config(f)


def test_unknown_nested_key_in_a_file_is_named_with_its_full_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl:\n  minibatchez: 3\nmodel:\n  hidden_size: 64\n")
    with pytest.raises(ValueError, match=r"^config key 'rl\.minibatchez': unknown key; valid keys here: \[.*'minibatches'"):
        load_config(f)
    f.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(ValueError, match=r"^config key 'model\.num_layer': unknown key; .*'num_layers'"):
        load_config(f)


def test_set_keeps_text_for_text_fields_and_reads_yaml_otherwise():
    cfg = load_config(None, ["name=123", "rl.regime=off", "model.family=llama", "rl.init=/ckpt/on",
                             "task.user_data=null", "rl.coef_clip=[0,1]", "seed=-3", "diag.first=false"])
    assert cfg.name == "123" and cfg.rl.regime == "off" and cfg.model.family == "llama"  # YAML would read off as false
    assert cfg.rl.init == "/ckpt/on" and cfg.task.user_data is None
    assert cfg.rl.coef_clip == (0.0, 1.0) and cfg.seed == -3 and cfg.diag.first is False
    assert load_config(None, ["task.user_data=data.jsonl"]).task.user_data == "data.jsonl"
    with pytest.raises(ValueError, match=r"^config key 'rl\.coef_clip': value .* not valid YAML"):
        load_config(None, ["rl.coef_clip=[0,"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["rl.lr"])


def test_yaml_1_1_exponent_text_is_a_float_and_lists_become_tuples(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  lr: 1e-3\nrl:\n  betas: [0.5, 9e-1]\n  coef_clip: [-1e-1, 2]\ndiag:\n  at: [3, 7]\n"
                 "task:\n  suites: [addition, linear]\n  weights: [2, 1e0]\n")
    cfg = load_config(f, ["rl.lr=3e-6"])
    assert cfg.sft.lr == 1e-3 and cfg.rl.lr == 3e-6 and cfg.rl.betas == (0.5, 0.9)
    assert cfg.rl.coef_clip == (-0.1, 2.0) and cfg.diag.at == (3, 7)
    assert cfg.task.suites == ("addition", "linear") and cfg.task.weights == (2.0, 1.0)
    assert all(type(w) is float for w in cfg.task.weights)
    with pytest.raises(ValueError, match=r"^config key 'sft\.lr': .*valid number"):
        load_config(None, ["sft.lr=1e-3x"])


def test_model_section_overrides_the_tiny_model_key_by_key_unless_init_from(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_size: 64\n  mtp_depths: 2\n  rms_norm_eps: 1e-5\n")
    m = load_config(f).model
    assert m == ModelConfig.tiny(hidden_size=64, mtp_depths=2, rms_norm_eps=1e-5)
    f.write_text("model:\n  init_from: /some/hf/dir\n")
    m = load_config(f).model
    assert m.init_from == "/some/hf/dir" and m.hidden_size is None and m.family is None
    assert load_config(None).model == ModelConfig.tiny()


def test_cross_field_checks_name_the_field():
    with pytest.raises(ValueError, match=r"^config key 'model': hidden_size=30 is not divisible"):
        load_config(None, ["model.hidden_size=30"])
    with pytest.raises(ValueError, match=r"^config key 'rl\.minibatches': must divide .* = 24"):
        load_config(None, ["rl.prompts_per_rollout=3", "rl.minibatches=5"])
    with pytest.raises(ValueError, match=r"^config key 'task\.weights'"):
        load_config(None, ["task.weights=[1,1]"])
    with pytest.raises(ValueError, match=r"^config key 'task\.difficulty': unknown suite 'algebra'"):
        load_config(None, ["task.difficulty={algebra: {max_digits: 3}}"])
    cfg = load_config(None, ["rl.prompts_per_rollout=3", "rl.group_size=4", "rl.minibatches=6"])
    assert (cfg.rl.batch_size, cfg.rl.minibatch_size) == (12, 2)


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
def test_dump_then_load_gives_an_equal_config(tmp_path, name):
    cfg = load_config(name, ["rl.coef_clip=[0,1]", "diag.at=[2]", "task.difficulty={addition: {max_digits: 2}}",
                             "sft.lr=1e-4"])
    dump_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert cfg.model_copy() == cfg and cfg.replace(seed=9) != cfg


def test_replace_is_validated_and_leaves_the_original():
    cfg = load_config(None)
    moved = cfg.replace(rl=cfg.rl.replace(init="/ckpt"))
    assert moved.rl.init == "/ckpt" and cfg.rl.init is None
    with pytest.raises(ValueError, match=r"'minibatches'"):
        cfg.rl.replace(minibatches=7)
    with pytest.raises(ValueError, match="frozen"):
        cfg.rl.lr = 1.0


def test_a_bare_name_finds_the_packaged_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")} >= {"tiny", "tiny_rl", "reference", "small"}
    assert load_config("tiny") == load_config("tiny.yaml") == load_config(PACKAGED_CONFIGS / "tiny.yaml")
    assert load_config("tiny").name == "tiny" and load_config("reference").name == "reference"
    with pytest.raises(FileNotFoundError, match=r"tinny.*tiny, tiny_rl"):
        load_config("tinny")
    (tmp_path / "tiny.yaml").write_text("name: mine\n")  # a real path wins over the packaged name
    assert load_config("tiny.yaml").name == "mine" and load_config("tiny").name == "tiny"


def test_the_repository_configs_link_still_reads_the_packaged_files():
    repo_configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(repo_configs / "tiny_rl.yaml") == load_config("tiny_rl")


def test_cli_names_an_unknown_config_and_lists_the_packaged_ones(tmp_path, capsys):
    assert main(["sft", "--config", "tinny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "tinny" in err and "tiny_rl" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- probe settings


def test_probe_settings_are_the_diag_sections_probe_fields():
    diag = load_config(None, ["diag.grid_cap=2", "diag.dtype=float64", "diag.every=3"]).diag
    s = ProbeSettings.from_diag(diag, seed=4)
    assert (s.grid_cap, s.dtype, s.seed) == (2.0, "float64", 4)
    assert set(ProbeSettings.model_fields) == set(ProbeFields.model_fields) | {"seed"}
    assert set(ProbeFields.model_fields) < set(type(diag).model_fields) and "seed" not in type(diag).model_fields


def test_probe_settings_round_trip_and_read_old_bundles():
    s = ProbeSettings(dtype="float64", curve_points=5, grid_cap=1.0, seed=11)
    assert ProbeSettings(**s.model_dump()) == s == ProbeSettings.model_validate(s.model_dump())
    old = {"dtype": "float32", "hvp_method": "rev-rev", "curve_points": 9, "curve_span": 3.0, "curve_default": 1.0,
           "curve_real_step": False, "bootstrap": 100, "taylor_halvings": 3, "grid_cap": 0.0, "seed": 7}
    dumped = ProbeSettings(**old).model_dump()  # what the dataclass's asdict stored reads back as it was,
    assert {k: dumped[k] for k in old} == old   # and the memory bounds added since are off (0)
    assert {k: dumped[k] for k in set(dumped) - set(old)} == {"row_chunk": 0, "jvp_batch": 0, "geometries_per_pass": 0,
                                                              "optimum_per_decade": 5, "fisher_all_geometries": False}
    older = {k: v for k, v in old.items() if k not in ("grid_cap", "taylor_halvings")}
    assert ProbeSettings(**older).grid_cap == 0.0
    assert s.replace(seed=12).seed == 12 and s.seed == 11
    with pytest.raises(ValueError, match="curve_points"):
        s.replace(curve_points=2)


def test_probe_overrides_are_validated_like_set():
    assert ProbeSettings.parse_overrides(["diag.grid_cap=1", "diag.dtype=float64", "diag.curve_span=5e-1"]) == {
        "grid_cap": 1.0, "dtype": "float64", "curve_span": 0.5}
    with pytest.raises(ValueError, match=r"^config key 'diag\.curve_points': needs at least 3"):
        ProbeSettings.parse_overrides(["diag.curve_points=2"])
    with pytest.raises(ValueError, match=r"^config key 'diag\.grid_cap': .*finite"):
        ProbeSettings.parse_overrides(["diag.grid_cap=inf"])
    for key in ("diag.every", "diag.seed", "rl.lr", "grid_cap"):
        with pytest.raises(ValueError, match=rf"--set {re.escape(key)}: only the probe settings .*diag\.grid_cap"):
            ProbeSettings.parse_overrides([f"{key}=1"])


# ---------------------------------------------------------------- shared names


def test_shared_names_agree_with_the_package():
    from occ_theory.tasks import SUITES

    assert names.SUITES == SUITES
    assert load_config(None).rl.regime in names.REGIMES and set(names.PROXY_NAMES) == {"reference", "least_squares",
                                                                                        "fisher"}


def test_names_and_probe_settings_import_without_torch():
    code = ("import sys, occ_theory.names, occ_theory.diagnostics.settings, analysis.load; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_config_key_is_documented_by_its_field_docstring():
    undocumented = [f"{sec}.{name}" for sec in SECTIONS
                    for name, f in Config.model_fields[sec].annotation.model_fields.items() if not f.description]
    assert not undocumented
    assert "λ-grid points" in ProbeSettings.model_fields["curve_points"].description
