"""The gradient recorder: ``g = ∇J`` and ``u = ∇M`` separately on the shared parameters θ_S.

On a scheduled step the trainer calls ``record`` on the live graph (before ``loss.backward``),
then ``check`` after it: identity 3 of THEORY.md says the gradient the optimizer receives on θ_S is
``−(g + λ·u)`` (the loss is ``−J − λ·M``). ``breakdown`` splits norms, cosine and C = gᵀu by module
(embeddings, each block, final norm, output head), which shows which layers conflict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import module_group


@dataclass
class GradRecord:
    g: list[Tensor]
    u: list[Tensor]


class GradientRecorder:
    def __init__(self, model: nn.Module):
        shared = set(model.shared_param_names())
        named = [(k, p) for k, p in model.named_parameters() if k in shared and p.requires_grad]
        self.names = [k for k, _ in named]
        self.params = [p for _, p in named]
        self.groups = [module_group(k) for k in self.names]

    def _grads(self, value: Tensor | None) -> list[Tensor]:
        if value is None or not value.requires_grad:
            return [torch.zeros_like(p) for p in self.params]
        gs = torch.autograd.grad(value, self.params, retain_graph=True, allow_unused=True, materialize_grads=True)
        return [g.detach().float() for g in gs]

    def record(self, rl_objective: Tensor, mtp_objective: Tensor | None, reduce=None) -> GradRecord:
        """g and u from the live graph (kept for the real backward that follows); ``reduce`` sums a
        dict of tensors over processes in data parallelism."""
        g, u = self._grads(rl_objective), self._grads(mtp_objective)
        if reduce is not None:
            both = reduce({f"g{i}": t for i, t in enumerate(g)} | {f"u{i}": t for i, t in enumerate(u)})
            g = [both[f"g{i}"] for i in range(len(g))]
            u = [both[f"u{i}"] for i in range(len(u))]
        return GradRecord(g, u)

    def check(self, rec: GradRecord, lam: float) -> dict[str, float]:
        """Identity 3: relative max deviation of the received ``.grad`` from ``−(g + λ·u)``."""
        worst, scale = 0.0, 0.0
        for p, g, u in zip(self.params, rec.g, rec.u):
            expected = -(g + lam * u)
            got = p.grad.detach().float() if p.grad is not None else torch.zeros_like(expected)
            worst = max(worst, float((got - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
        return {"diag/identity3/max_abs_err": worst,
                "diag/identity3/rel_err": worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)}

    def breakdown(self, rec: GradRecord) -> dict[str, float]:
        """Norms of g and u, their cosine and C = gᵀu, overall and per module group (SGD geometry)."""
        acc: dict[str, list[float]] = {}
        for grp, g, u in zip(self.groups, rec.g, rec.u):
            for key in ("all", grp):
                a = acc.setdefault(key, [0.0, 0.0, 0.0])
                a[0] += float((g * g).sum())
                a[1] += float((u * u).sum())
                a[2] += float((g * u).sum())
        out = {}
        for key, (gg, uu, gu) in acc.items():
            prefix = "diag/grad" if key == "all" else f"diag/module/{key}"
            out[f"{prefix}/g_norm"] = math.sqrt(gg)
            out[f"{prefix}/u_norm"] = math.sqrt(uu)
            out[f"{prefix}/corr"] = gu
            out[f"{prefix}/cos"] = gu / math.sqrt(gg * uu) if gg > 0 and uu > 0 else math.nan
        return out
