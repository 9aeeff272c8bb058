"""Read run directories into pandas, torch-free.

A run directory (written by ``occ rl``) holds ``config.yaml`` and ``metrics.jsonl`` and, when the
later stages ran, ``probes.parquet`` (``occ probe``) and ``eval.json``; the ``eval.json`` of the SFT
checkpoint it started from (``rl.init``) is read when ``occ eval`` wrote one there. ``load_run`` reads one into
a ``Run``; ``load_runs`` takes run directories or folders of them. Every missing required file or
corrupt file raises ``RunFileError`` naming the file and the problem.

``read_jsonl`` tolerates a truncated last line (a run killed mid-write) and refuses a corrupt
line anywhere else, naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from occ_theory.jsonl import RunFileError, read_jsonl
from occ_theory.names import CONFIG_FILE, EVAL_FILE, METRICS_FILE, PROBES_FILE, REGIME_TABLE

FIXED_LAMBDA_REGIMES = tuple(r.name for r in REGIME_TABLE.values() if r.arm == "coef")
"""Regimes trained with a fixed λ = ``rl.mtp_coef`` on a loss into θ_S (outcome against λ: claim 7): ``rl.mtp_coef``
names their arm (``names.REGIME_TABLE``)."""


@dataclass
class Run:
    """One loaded run directory. ``name`` is the directory's name (config ``name`` is not unique)."""

    name: str
    path: Path
    config: dict[str, Any]
    regime: str
    seed: int
    metrics: pd.DataFrame
    probes: pd.DataFrame | None = None
    eval: dict[str, Any] | None = None
    sft_eval: dict[str, Any] | None = None
    """``eval.json`` of the checkpoint RL started from (``rl.init``; written by ``occ eval CHECKPOINT``)."""
    notes: list[str] = field(default_factory=list)
    """What is partial about the run (a torn last metrics line, no steps logged, no eval.json): listed in the report."""

    @property
    def rl(self) -> dict[str, Any]:
        return self.config["rl"] if isinstance(self.config.get("rl"), dict) else {}

    @property
    def arm(self) -> str:
        """The run's arm: see ``arm_name``."""
        return arm_name(self.regime, self.rl)

    @property
    def base_coef(self) -> float:
        """``c``: ``rl.mtp_coef`` divided by the number of MTP depths (``model.mtp_depths``, default 1), the
        scale of the ``reference`` and ``least_squares`` proxies (docs/theory.md section 4)."""
        model = self.config.get("model") if isinstance(self.config.get("model"), dict) else {}
        coef, depths = self.rl.get("mtp_coef", np.nan), model.get("mtp_depths", 1) or 1
        return float(coef) / float(depths) if isinstance(coef, int | float) else np.nan

    @property
    def rl_suites(self) -> list[str] | None:
        """The suites RL trained on (``task.suites``), or None when the config does not say."""
        task = self.config.get("task") if isinstance(self.config.get("task"), dict) else {}
        suites = task.get("suites")
        return [str(s) for s in suites] if isinstance(suites, list) else None

    @property
    def is_rl(self) -> bool:
        """False for an SFT run directory (its metrics are ``sft/…``; its config still has an ``rl`` section)."""
        return not any(str(c).startswith("sft/") for c in self.metrics.columns)

    @property
    def steps(self) -> int:
        """The last logged optimizer step (0 when nothing was logged yet)."""
        s = self.metrics["step"] if "step" in self.metrics else pd.Series(dtype=float)
        return int(s.max()) if s.notna().any() else 0


def read_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"missing file: {path}")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RunFileError(f"{path}: not valid YAML{at} ({what})") from e
    if not isinstance(cfg, dict):
        raise RunFileError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def metrics_from_records(records: list[dict], path: Path) -> pd.DataFrame:
    """One row per step, sorted; JSON nulls become NaN; a repeated step keeps its last record."""
    for i, rec in enumerate(records, 1):
        if "step" not in rec:
            raise RunFileError(f"{path}: record {i} has no 'step'")
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame({"step": pd.Series(dtype="int64")})
    df = df.astype({c: float for c in df.columns if df[c].isna().all()})  # all-null columns: NaN floats
    df = df.where(df.notna(), np.nan)  # None in object columns -> NaN
    return df.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True).copy()


def read_metrics(path: Path) -> pd.DataFrame:
    return metrics_from_records(read_jsonl(path), Path(path))


def read_probes(path: Path) -> pd.DataFrame | None:
    """``probes.parquet`` sorted by step, or None when absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damage
        raise RunFileError(f"{path}: corrupt or unreadable parquet ({type(e).__name__}: {e})") from e
    if "step" not in df.columns:
        raise RunFileError(f"{path}: has no 'step' column")
    return df.sort_values("step", kind="stable").reset_index(drop=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: not valid JSON ({e})") from e


def read_eval(path: Path) -> dict[str, Any] | None:
    """``eval.json`` (``{"suites": {suite: {"greedy_acc", …}}, …}``), or None when absent."""
    path = Path(path)
    if not path.exists():
        return None
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("suites"), dict):
        raise RunFileError(f"{path}: expected an object with a 'suites' mapping")
    for suite, entry in data["suites"].items():
        if not isinstance(entry, dict) or "greedy_acc" not in entry:
            raise RunFileError(f"{path}: suite {suite!r} has no 'greedy_acc'")
    return data


STEP_COST_FILE = "step_cost.json"
"""``occ cost``'s interleaved step times of an experiment's arms, beside its runs (claim 6)."""


def read_step_cost(path: Path) -> dict[str, Any]:
    """``step_cost.json``: ``{"rounds": N, "arms": {arm: {"times_s": [N seconds]}}, …}``, validated."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"missing file: {path}")
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("arms"), dict) or not isinstance(data.get("rounds"), int):
        raise RunFileError(f"{path}: expected an object with 'rounds' (an integer) and an 'arms' mapping")
    for arm, entry in data["arms"].items():
        times = entry.get("times_s") if isinstance(entry, dict) else None
        if (not isinstance(times, list) or len(times) != data["rounds"] or not all(
                isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in times)):
            raise RunFileError(f"{path}: arm {arm!r} needs 'times_s', {data['rounds']} finite positive seconds")
    return data


def common_parent(run_dirs: Iterable[Path]) -> Path:
    """The run directories' common parent folder (where their report and ``step_cost.json`` go by default)."""
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    if not parents:
        raise RunFileError("no run directory given")
    return Path(os.path.commonpath(parents))


def step_cost_path(run_dirs: Iterable[Path]) -> Path:
    """Where an experiment's ``step_cost.json`` lives: in ``common_parent`` (``occ cost`` writes it there by
    default, ``occ figures`` looks for it there)."""
    return common_parent(run_dirs) / STEP_COST_FILE


def check_step_cost(cost: dict[str, Any], runs: list[Run], path: Path) -> None:
    """Refuse a ``step_cost.json`` of another experiment: every arm it timed must be an arm of ``runs``, timed
    from a run among them (``RunFileError`` naming the mismatch)."""
    arms = {r.arm for r in runs}
    paths = {str(r.path.resolve()) for r in runs}
    for arm, entry in cost["arms"].items():
        if arm not in arms:
            raise RunFileError(f"{path}: times arm {arm!r}, which none of these runs is (arms: {sorted(arms)})")
        run = entry.get("run")
        if isinstance(run, str) and str(Path(run).resolve()) not in paths:
            raise RunFileError(f"{path}: arm {arm!r} was timed from {run}, which is not among these runs")


def load_run(path: Path, probes_file: str = PROBES_FILE) -> Run:
    """Read one run directory (see the module docstring); ``probes_file`` names another
    ``occ probe --out`` file to read instead of ``probes.parquet``."""
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    cfg = read_config(cfg_path)
    rl = cfg.get("rl") if isinstance(cfg.get("rl"), dict) else {}
    if "regime" not in rl:
        raise RunFileError(f"{cfg_path}: has no 'rl.regime'")
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int):
        raise RunFileError(f"{cfg_path}: 'seed' must be an integer, got {seed!r}")
    run = Run(name=path.name, path=path, config=cfg, regime=str(rl["regime"]), seed=seed,
              metrics=read_metrics(path / METRICS_FILE), probes=read_probes(path / probes_file),
              eval=read_eval(path / EVAL_FILE), sft_eval=_sft_eval(path, rl.get("init")))
    if _torn_tail(path / METRICS_FILE):
        run.notes.append(f"{METRICS_FILE}: its last line was cut off mid-write and is left out (a killed run)")
    if run.steps == 0:
        run.notes.append(f"{METRICS_FILE}: no step logged")
    if run.eval is None and run.is_rl:
        run.notes.append(f"no {EVAL_FILE}: unfinished, or evaluated elsewhere")
    return run


def _torn_tail(path: Path) -> bool:
    """Whether the file's last line is an incomplete JSON record (``read_jsonl`` drops it)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text or text.endswith("\n"):
        return False
    try:
        json.loads(text.rsplit("\n", 1)[-1])
    except json.JSONDecodeError:
        return True
    return False


def arm_name(regime: str, rl: dict[str, Any]) -> str:
    """What distinguishes runs of one regime: ``occ/<proxy>`` (``occ/reference``), ``<regime>@<mtp_coef>`` for the
    fixed-λ regimes (``ce@0.1``, ``policy@0.3``), the rule otherwise (``off``, ``detach``, ``real``, ``cosine``,
    ``upgrad``); then ``/<clip_scope>`` when the clip is not the global one (``detach/separate``)."""
    coef, kind = rl.get("mtp_coef"), REGIME_TABLE[regime].arm if regime in REGIME_TABLE else "regime"
    if kind == "proxy":
        arm = f"{regime}/{rl.get('proxy', 'reference')}"
    elif kind == "coef" and isinstance(coef, int | float):
        arm = f"{regime}@{coef:g}"
    else:
        arm = regime
    scope = rl.get("clip_scope", "global")
    return arm if scope in (None, "global") else f"{arm}/{scope}"


def resolve_init(run_dir: Path, init: Any, holding: str) -> Path | None:
    """The RL run's ``rl.init`` folder that holds the file ``holding``, or None. A relative ``init`` is tried
    against the working directory, then against each folder above the run (``occ rl`` records it as given)."""
    if not isinstance(init, str) or not init:
        return None
    init_path = Path(init)
    bases = [Path()] if init_path.is_absolute() else [Path(), *Path(run_dir).resolve().parents]
    for base in bases:
        if (base / init_path / holding).is_file():
            return base / init_path
    return None


def _sft_eval(run_dir: Path, init: Any) -> dict[str, Any] | None:
    """``eval.json`` of the RL run's ``rl.init`` checkpoint (``resolve_init``), or None."""
    found = resolve_init(run_dir, init, EVAL_FILE)
    return read_eval(found / EVAL_FILE) if found is not None else None


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself when it holds ``config.yaml``, else every directory below it that does (sorted)."""
    path = Path(path)
    if not path.is_dir():
        raise RunFileError(f"missing run directory: {path}")
    if (path / CONFIG_FILE).is_file():
        return [path]
    return sorted(p.parent for p in path.rglob(CONFIG_FILE) if p.parent != path)


def _headless_run_dirs(path: Path) -> list[Path]:
    """Directories below ``path`` that hold a ``metrics.jsonl`` but no ``config.yaml``: runs that cannot be read."""
    path = Path(path)
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return []
    return sorted(p.parent for p in path.rglob(METRICS_FILE) if not (p.parent / CONFIG_FILE).is_file())


def load_runs(paths: Iterable[Path] | Path, probes_file: str = PROBES_FILE) -> list[Run]:
    """Runs from run directories and folders of run directories; a folder with none, or any run that cannot be
    read, raises (``load_runs_checked`` with ``skip_bad`` reports without them)."""
    return load_runs_checked(paths, probes_file)[0]


def load_runs_checked(paths: Iterable[Path] | Path, probes_file: str = PROBES_FILE, skip_bad: bool = False
                      ) -> tuple[list[Run], list[tuple[str, str]]]:
    """``(runs, dropped)``: the readable runs, and ``(path, why)`` for each run left out. Without ``skip_bad`` the
    first unreadable run raises ``RunFileError`` naming it (and the flag); with it, the run is dropped and named.
    A directory below a folder with a ``metrics.jsonl`` but no ``config.yaml`` is always named among the dropped."""
    if isinstance(paths, str | Path):
        paths = [paths]
    runs, seen, dropped = [], set(), []
    for p in paths:
        dirs = find_run_dirs(Path(p))
        dropped += [(str(d), f"no {CONFIG_FILE}") for d in _headless_run_dirs(Path(p))]
        if not dirs:
            raise RunFileError(f"{p}: no run directory (a folder holding {CONFIG_FILE}) found")
        for d in dirs:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            try:
                runs.append(load_run(d, probes_file))
            except RunFileError as e:
                if not skip_bad:
                    raise RunFileError(f"{e} (pass --skip-bad to report on the other runs)") from e
                dropped.append((str(d), str(e)))
    return runs, dropped


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[tuple[str, str]]]:
    """One run per (arm, seed, starting checkpoint), and one per set of identical training logs within an arm: copies
    of a run (CPU runs are bit-for-bit deterministic, so runs started without ``--seed`` are copies) are not
    independent replicates. The most complete copy is kept (with ``eval.json``, the most steps, then the first by
    name). Returns the runs counted and ``(name, why)`` for each copy left out."""
    kept, repeats, seen = [], [], {}
    for run in sorted(runs, key=lambda r: (r.eval is None, -r.steps, r.name)):
        key = (run.arm, run.seed, str(run.rl.get("init")))
        trace = _trace(run)
        twin = seen.get(key) or next((seen[k] for k in seen if k[0] == run.arm and trace is not None
                                      and _trace(seen[k]) == trace), None)
        if twin is not None:
            why = (f"arm {run.arm} seed {run.seed}, as {twin.name}" if key == (twin.arm, twin.seed,
                                                                                str(twin.rl.get("init")))
                   else f"the same training log as {twin.name} (arm {run.arm})")
            repeats.append((run.name, why))
            continue
        seen[key] = run
        kept.append(run)
    return sorted(kept, key=lambda r: r.name), repeats


def _trace(run: Run) -> int | None:
    """A fingerprint of the run's training log: every logged value but the timings (``perf/…``, tokens per second),
    or None when it logged no step. Copies of a run have the same one."""
    m = run.metrics
    if not len(m):
        return None
    cols = sorted(c for c in m.columns if not str(c).startswith("perf/") and not str(c).endswith("tokens_per_s"))
    values = m[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float).round(12)
    return hash((tuple(cols), values.shape, np.nan_to_num(values, nan=np.inf).tobytes()))
