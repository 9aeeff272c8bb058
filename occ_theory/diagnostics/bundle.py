"""Probe bundles: what ``run_probe`` needs to recompute one step offline, written atomically.

``probes/step_N/bundle.pt`` holds the model weights before the step, the (global) minibatch, the
objective spec, the coefficient applied (``rl/coef.py: Coefficient``: λ and the values it used), the
optimizer snapshot and the probe settings; ``online.json`` the
values the trainer computed. ``occ probe`` reruns ``run_probe`` on the bundle (``probe_from_bundle``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..jsonl import json_safe
from ..rl.batch import ObjectiveSpec, RLBatch
from ..rl.coef import Coefficient
from .probe import OptimizerSnapshot, Probe, ProbeSettings, run_probe

BUNDLE_FILE = "bundle.pt"


def save_bundle(path: Path, *, step: int, model: nn.Module, batch: RLBatch, spec: ObjectiveSpec, coef: Coefficient,
                optim: OptimizerSnapshot, settings: ProbeSettings,
                heldout: RLBatch | None = None, online: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None, realised: tuple[float, float] | None = None) -> None:
    """Everything ``run_probe`` needs for this step, written atomically to ``path/``."""
    from ..atomic import atomic_dir

    payload = {
        "format": "occ_theory.probe", "version": 2, "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "batch": {k: v.cpu() for k, v in batch.tensors().items()},
        "heldout": None if heldout is None else {k: v.cpu() for k, v in heldout.tensors().items()},
        "spec": asdict(spec), "coef": coef.as_dict(), "realised": realised,
        "optim": optim.to_dict(), "settings": settings.model_dump(), "extra": dict(extra or {}),
    }
    with atomic_dir(Path(path)) as tmp:
        torch.save(payload, tmp / BUNDLE_FILE)
        if online is not None:
            (tmp / "online.json").write_text(json.dumps(json_safe(online), indent=1, allow_nan=False))


def load_bundle(path: Path) -> dict[str, Any]:
    """Read a probe bundle; a missing or corrupt one raises ``ValueError`` naming the file."""
    f = Path(path) / BUNDLE_FILE
    if not f.is_file():
        raise ValueError(f"probe bundle {path} has no {BUNDLE_FILE}")
    try:
        # mmap: tensors are read from the file when used (occ probe --online reads only the small fields)
        payload = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on damage
        raise ValueError(f"probe bundle {f} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "occ_theory.probe":
        raise ValueError(f"{f} is not an occ_theory probe bundle")
    if isinstance(payload.get("spec"), dict) and "mtp_grad" in payload["spec"]:  # version 1 named the cut mtp_grad
        payload["spec"]["grad_cut"] = payload["spec"].pop("mtp_grad")
    if "coef" not in payload and {"lam_used", "base_coef"} <= payload.keys():  # version 1 stored the two numbers
        payload["coef"] = Coefficient(float(payload["lam_used"]), "unknown", float(payload["base_coef"])).as_dict()
    missing = [k for k in ("step", "model", "batch", "spec", "optim", "settings", "coef") if k not in payload]
    if missing:
        raise ValueError(f"probe bundle {f} lacks {missing}")
    return payload


def probe_from_bundle(payload: dict[str, Any], model: nn.Module, settings: dict[str, Any] | None = None) -> Probe:
    """Load the bundle's weights into ``model`` (same architecture) and rerun the probe, with the
    bundle's ``ProbeSettings`` except the fields given in ``settings`` (e.g. another λ grid)."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError:
        from ..models.io import state_mismatch

        raise ValueError("probe bundle weights do not fit the model they load into (RUN/init, or occ probe --model "
                         f"/ --init): {state_mismatch(model.state_dict(), payload['model'])}") from None
    heldout = RLBatch.from_tensors(payload["heldout"]) if payload.get("heldout") else None
    return run_probe(model, RLBatch.from_tensors(payload["batch"]), ObjectiveSpec(**payload["spec"]),
                     Coefficient.from_dict(payload["coef"]), OptimizerSnapshot.from_dict(payload["optim"]),
                     ProbeSettings(**(payload["settings"] | (settings or {}))), heldout,
                     realised=payload.get("realised"))
