"""``occ probe RUN_DIR``: recompute every diagnostic from a run's probe bundles into ``probes.parquet``.

``occ probe RUN_DIR --online`` collects the values the run computed online (``probes/step_N/online.json``)
into the same table without recomputing them: the fast path when only the table is wanted.
``occ probe RUN_DIR --set diag.grid_cap=1 --probes probes_cap1.parquet`` recomputes them with other
probe settings (any ``ProbeSettings`` field: the λ grid, the dtype, the HVP method, ...) into a
file of its own, leaving ``probes.parquet`` (the online values) as it is.

One row per probe step: the run's regime and seed, every decomposition quantity in both geometries,
every proxy, the measured curve (``curve/lams``, ``curve/deltas`` as lists) and its fit. The
computation is ``run_probe`` on the bundle's saved state, the same function the trainer ran online,
so the values agree with ``probes/step_N/online.json``.

Everything is checked before the first bundle is computed (the runs, ``--steps``, the settings, that
the output can be written). A missing or corrupt bundle stops the run's recomputation: what was
computed goes to ``<name>.partial.parquet`` and the error names the bundle; ``--skip-bad`` goes on
past it and names it on stderr. Threads: the run's ``threads`` setting unless ``--threads`` is given.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_bytes, check_output_file
from ..models import load_any
from ..models.config import DEFAULT_MTP_INIT
from ..names import ONLINE_FILE, PROBES_FILE
from ..progress import Progress
from ..runtime import set_threads
from ..validated import yaml_problem
from .bundle import load_bundle, probe_from_bundle
from .probe import ProbeSettings


def bundle_dirs(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "probes"
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_")) if d.is_dir() else []


def read_online(bundle_dir: Path) -> dict[str, Any] | None:
    f = Path(bundle_dir) / ONLINE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


@dataclass(frozen=True)
class ProbeJob:
    """One run's recomputation, checked before any work: its bundles, changed settings, output file."""

    run_dir: Path
    bundles: list[Path]
    changed: dict[str, Any] | None
    cfg: dict[str, Any]
    out: Path
    model: Path
    """The model the bundles' weights load into: ``run_dir/init`` unless ``occ probe --model`` names one."""
    online: bool = False
    """Collect each bundle's ``online.json`` instead of recomputing it."""


def bundle_step(bundle: Path) -> int:
    """The step a bundle directory (``probes/step_NNNNNN``) was written at."""
    return int(bundle.name.split("_")[1])


def plan_run(run_dir: Path, steps: list[int] | None = None, overrides: list[str] | None = None,
             out_name: str = PROBES_FILE, model: str | Path | None = None, online: bool = False) -> ProbeJob:
    """Validate a recomputation of ``run_dir``: the run, ``steps`` (default all), the ``overrides``
    (``diag.<field>=value``, which need an ``out_name`` of their own), the model the bundles load into
    (``model``, default ``run_dir/init``) and that ``run_dir/out_name`` can be written. ``online``: collect the
    online values instead (no model needed; refused with changed settings, which only a recomputation has)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: config.yaml is missing")
    if overrides and out_name == PROBES_FILE:
        raise ValueError(f"changed probe settings go to a file of their own (--probes NAME), not {PROBES_FILE}, "
                         "which holds the values the run computed online")
    if Path(out_name).name != out_name or not out_name.endswith(".parquet"):
        raise ValueError(f"--probes {out_name!r}: a file name ending in .parquet (written inside each run directory)")
    changed = ProbeSettings.parse_overrides(overrides) if overrides else None
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_path}: not valid YAML ({yaml_problem(e)})") from e
    bundles = bundle_dirs(run_dir)
    if not bundles:
        raise ValueError(f"{run_dir} has no probe bundles under probes/ (was diag.probes on?)")
    if steps is not None:
        have = {bundle_step(b): b for b in bundles}
        missing = sorted(set(steps) - set(have))
        if missing:
            raise ValueError(f"--steps: {run_dir} has no probe bundle at step {', '.join(map(str, missing))}; "
                             f"its probe steps are {', '.join(map(str, sorted(have)))}")
        bundles = [have[s] for s in sorted(set(steps))]
    if online and overrides:
        raise ValueError("--online collects the values the run computed with its own settings; "
                         "changed settings (--set) need a recomputation, without --online")
    if online and (lacking := [b.name for b in bundles if not (b / ONLINE_FILE).is_file()]):  # read once, in run_job
        raise ValueError(f"--online: {run_dir} has no {ONLINE_FILE} in probe bundle(s) {', '.join(lacking)}; "
                         "recompute them without --online")
    model = Path(model) if model is not None else run_dir / "init"
    if not online and not model.exists():
        raise ValueError(f"{run_dir}: the model its probe bundles load into, {model}, is missing "
                         "(occ probe --model PATH names the run's starting model)")
    out = run_dir / out_name
    check_output_file(out, "occ probe --probes")
    return ProbeJob(run_dir, bundles, changed, cfg, out, model, online)


def run_job(job: ProbeJob, skip_bad: bool = False, threads: int | None = None) -> Path:
    """Recompute ``job``'s bundles into ``job.out``, with ``threads`` torch threads (default: the run's
    ``threads``). A missing or corrupt bundle stops it: the rows computed so far go to
    ``<name>.partial.parquet`` (the output file is complete or absent) and a ``ValueError`` names the
    bundle. ``skip_bad`` goes on past bad bundles, writes the output without them and names them on stderr."""

    set_threads(int(job.cfg.get("threads") or 0) if threads is None else threads)
    mc = job.cfg.get("model") or {}
    model = None if job.online else load_any(job.model, mc.get("mtp_depths", 1), mc.get("mtp_init", DEFAULT_MTP_INIT),
                                             seed=job.cfg.get("seed", 0))[0]
    rl = job.cfg.get("rl", {})
    rows, bad = [], []
    progress = Progress(f"probe {job.run_dir.name}", len(job.bundles))
    for i, b in enumerate(job.bundles, 1):
        try:
            payload = load_bundle(b)
            if job.online:
                online = read_online(b)
                if online is None:
                    raise ValueError(f"has no {ONLINE_FILE} (recompute it: occ probe without --online)")
                res = {k: None if v is None and k.rsplit("/", 1)[-1] in _UNDETERMINED else _from_json(v)
                       for k, v in online.items()}
            else:
                res = probe_from_bundle(payload, model, job.changed).record
            coef = payload["coef"]  # the coefficient the run applied: the bundle is its one source
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            bad.append(f"{b}: {type(e).__name__}: {e}")
            if not skip_bad:
                break
            continue
        row = {"run": job.run_dir.name, "regime": rl.get("regime"), "seed": job.cfg.get("seed"),
               "step": payload["step"], "proxy": rl.get("proxy"), "mtp_coef": coef["mtp_coef"],
               "lambda/used": coef["value"], "lambda/rule": coef["rule"], **payload.get("extra", {})}
        row |= {k: _cell(v) for k, v in res.items()}
        rows.append(row)
        progress.update(i)
    if bad and not skip_bad:
        partial = job.out.with_name(job.out.stem + ".partial.parquet")
        kept = f"the {len(rows)} rows before it are in {_write(rows, partial)}" if rows else "no row was computed"
        raise ValueError(f"bad probe bundle {bad[0]}; {kept}; --skip-bad goes on past bad bundles")
    if not rows:
        raise ValueError(f"{job.run_dir}: every probe bundle is bad, first {bad[0]}")
    for line in bad:
        print(f"occ probe: warning: skipped bad probe bundle {line}", file=sys.stderr)
    return _write(rows, job.out)


def recompute_run(run_dir: Path, steps: list[int] | None = None, overrides: list[str] | None = None,
                  out_name: str = PROBES_FILE, skip_bad: bool = False, threads: int | None = None,
                  online: bool = False) -> Path:
    """Rerun the probe bundles of ``run_dir`` into ``run_dir/out_name`` (``plan_run``, then ``run_job``); ``online``:
    collect the values the run computed instead."""
    return run_job(plan_run(run_dir, steps, overrides, out_name, online=online), skip_bad, threads)


def _write(rows: list[dict[str, Any]], out: Path) -> Path:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(rows).sort_values("step").to_parquet(buf, index=False)
    atomic_write_bytes(out, buf.getvalue())
    return out


_UNDETERMINED = frozenset({"concave", "flat", "grid_capped", "interior_max", "lambda_star_inside", "reason",
                           "geometry"})
"""The record's flags and labels: None there means undetermined, not a non-finite float."""


def _from_json(v: Any) -> Any:
    """A value of ``online.json`` as the probe computed it: JSON wrote its non-finite floats as null."""
    if v is None:
        return float("nan")
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return float("nan")
    return v
