"""``occ probe RUN_DIR``: recompute every diagnostic from a run's probe bundles into ``probes.parquet``.

``occ probe RUN_DIR --set diag.grid_cap=1 --out probes_cap1.parquet`` recomputes them with other
probe settings (any ``ProbeSettings`` field: the λ grid, the dtype, the HVP method, ...) into a
file of its own, leaving ``probes.parquet`` (the online values) as it is.

One row per probe step: the run's regime and seed, every decomposition quantity in both geometries,
every proxy, the measured curve (``curve/lams``, ``curve/deltas`` as lists) and its fit. The
computation is ``run_probe`` on the bundle's saved state, the same function the trainer ran online,
so the values agree with ``probes/step_N/online.json``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_bytes
from ..models import load_model
from ..names import ONLINE_FILE, PROBES_FILE
from ..progress import Progress
from .bundle import load_bundle, probe_from_bundle
from .probe import ProbeSettings


def bundle_dirs(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "probes"
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_")) if d.is_dir() else []


def read_online(bundle_dir: Path) -> dict[str, Any] | None:
    f = Path(bundle_dir) / ONLINE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def recompute_run(run_dir: Path, steps: list[int] | None = None, overrides: list[str] | None = None,
                  out_name: str = PROBES_FILE) -> Path:
    """Rerun every probe bundle of ``run_dir`` into ``run_dir/out_name``; ``overrides``
    (``diag.<field>=value``) change the probe settings, and then need an ``out_name`` of their own."""
    import pandas as pd

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: config.yaml is missing")
    if overrides and out_name == PROBES_FILE:
        raise ValueError(f"changed probe settings go to a file of their own (--out NAME), not {PROBES_FILE}, "
                         "which holds the values the run computed online")
    if Path(out_name).name != out_name or not out_name.endswith(".parquet"):
        raise ValueError(f"--out {out_name!r}: a file name ending in .parquet (written inside each run directory)")
    changed = ProbeSettings.parse_overrides(overrides) if overrides else None
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    bundles = bundle_dirs(run_dir)
    if steps is not None:
        bundles = [b for b in bundles if int(b.name.split("_")[1]) in steps]
    if not bundles:
        raise ValueError(f"{run_dir} has no probe bundles under probes/ (was diag.probes on?)")
    model = load_model(run_dir / "init")
    rl = cfg.get("rl", {})
    rows = []
    progress = Progress(f"probe {run_dir.name}", len(bundles))
    for i, b in enumerate(bundles, 1):
        payload = load_bundle(b)
        res = probe_from_bundle(payload, model, changed).record
        coef = payload["coef"]  # the coefficient the run applied: the bundle is its one source
        row = {"run": run_dir.name, "regime": rl.get("regime"), "seed": cfg.get("seed"), "step": payload["step"],
               "proxy": rl.get("proxy"), "mtp_coef": coef["mtp_coef"], "lambda/used": coef["value"],
               "lambda/rule": coef["rule"], **payload.get("extra", {})}
        row |= {k: _cell(v) for k, v in res.items()}
        rows.append(row)
        progress.update(i)
    df = pd.DataFrame(rows).sort_values("step")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    out = run_dir / out_name
    atomic_write_bytes(out, buf.getvalue())
    return out


def _cell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return float("nan")
    return v
