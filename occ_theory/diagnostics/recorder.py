"""The gradient recorder: ``g = ∇J`` and ``u = ∇M`` on θ_S at every step, identity 3, and the split by module.

* ``mtp_grad`` takes u from the live graph before the backward pass (one extra backward of M);
  ``observe`` then reads g off the gradient the optimizer received, ``g = −∇L − λ·u`` (the loss is
  ``L = −J − λ·M``), and keeps bias-corrected momentum buffers ``m_g``, ``m_u`` with Adam's β₁: the
  directions of the ``adam_stationary`` geometry (docs/theory.md section 2). Memory: two θ_S-sized
  buffers, only in runs that track them.
* ``check`` compares the gradient the optimizer received with ``−(g + λ·u)`` for the g and u a probe
  measured functionally (identity 3): a mismatch means the probe measures other objectives than the
  ones trained (another batch, a missing gradient cut, another normaliser).
* ``module_breakdown`` splits norms, cosine and C = gᵀu by module (embeddings, each block, final
  norm, output head), which shows which layers conflict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..models import module_group


def wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (a float64 model's gradients stay float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class GradientRecorder:
    def __init__(self, model: nn.Module, beta1: float = 0.9, track_momentum: bool = False):
        shared = set(model.shared_param_names())
        named = [(k, p) for k, p in model.named_parameters() if k in shared and p.requires_grad]
        self.names = [k for k, _ in named]
        self.params = [p for _, p in named]
        self.mtp_params = [p for k, p in model.named_parameters() if k not in shared and p.requires_grad]  # θ_M
        self.mtp_grad_sq = 0.0  # ‖∇_{θ_M}M‖² of the last mtp_grad call
        self.beta1 = beta1
        self.track_momentum = track_momentum
        self.count = 0  # steps averaged into the momentum buffers
        self.m_g: dict[str, Tensor] = {}
        self.m_u: dict[str, Tensor] = {}

    def mtp_grad(self, mtp_objective: Tensor | None, reduce: Any = None) -> dict[str, Tensor]:
        """u = ∇M on θ_S from the live graph (kept for the backward that follows); zeros without an MTP
        path. The same backward pass leaves ‖∇_{θ_M}M‖² in ``mtp_grad_sq`` (what θ_M adds to the global clip's
        norm, per unit λ²). ``reduce`` sums over processes."""
        n = len(self.params)
        if mtp_objective is None or not mtp_objective.requires_grad:
            grads = [torch.zeros_like(p) for p in (*self.params, *self.mtp_params)]
        else:
            grads = torch.autograd.grad(mtp_objective, [*self.params, *self.mtp_params], retain_graph=True,
                                        allow_unused=True, materialize_grads=True)
        out = {k: wide(t.detach()) for k, t in zip(self.names, grads[:n])}
        out |= {f"θ_M/{i}": wide(t.detach()) for i, t in enumerate(grads[n:])}
        out = reduce(out) if reduce is not None else out
        self.mtp_grad_sq = sum(float((out.pop(f"θ_M/{i}").double() ** 2).sum()) for i in range(len(self.mtp_params)))
        return out

    def received(self, grads: dict[str, Tensor] | None = None) -> dict[str, Tensor | None]:
        """The gradient the optimizer received on θ_S by name: ``grads`` when given (a sharded model's, in full),
        else each parameter's ``.grad``."""
        return grads if grads is not None else {name: p.grad for name, p in zip(self.names, self.params)}

    def observe(self, u: dict[str, Tensor], weight_g: float, weight_u: float,
                grads: dict[str, Tensor] | None = None) -> None:
        """After the backward pass (gradients summed over processes, before clipping), when the optimizer's
        gradient on θ_S is ``−(weight_g·g + weight_u·u)`` (``1, λ`` for the loss −J − λM): g follows from it;
        both enter the momentum buffers. ``grads``: that gradient in full, where ``.grad`` holds a shard."""
        if not self.track_momentum:
            return
        got = self.received(grads)
        gs = {name: (-(wide(got[name].detach()) if got[name] is not None else torch.zeros_like(u[name]))
                     - weight_u * u[name]) / weight_g for name in self.names}
        if not all(bool(torch.isfinite(t).all()) for t in (*gs.values(), *u.values())):
            return  # a skipped step: it does not enter the optimizer's momentum either
        self.count += 1
        b = self.beta1
        for name, g in gs.items():
            for buf, x in ((self.m_g, g), (self.m_u, u[name])):
                buf[name] = (1 - b) * x if name not in buf else b * buf[name] + (1 - b) * x

    def momentum(self) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
        """Bias-corrected ``(m̂_g, m̂_u)``, or None before the first observed step."""
        if not self.count:
            return None
        c = 1 - self.beta1 ** self.count
        return {k: v / c for k, v in self.m_g.items()}, {k: v / c for k, v in self.m_u.items()}

    def check(self, g: dict[str, Tensor], u: dict[str, Tensor], weight_g: float, weight_u: float,
              grads: dict[str, Tensor] | None = None) -> dict[str, float]:
        """Identity 3: relative max deviation of the received ``.grad`` (or ``grads``, as in ``observe``) from
        ``−(weight_g·g + weight_u·u)`` (``1, λ`` for the loss −J − λM; a rule's own weights where it replaced the
        update on θ_S)."""
        worst, scale = 0.0, 0.0
        received = self.received(grads)
        for name in self.names:
            expected = -(weight_g * g[name] + weight_u * u[name]).double()
            got = received[name].detach().double() if received[name] is not None else torch.zeros_like(expected)
            worst = max(worst, float((got - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
        return {"diag/identity3/max_abs_err": worst,
                "diag/identity3/rel_err": worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)}

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "m_g": self.m_g, "m_u": self.m_u}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.count, self.m_g, self.m_u = sd["count"], dict(sd["m_g"]), dict(sd["m_u"])


def module_breakdown(g: dict[str, Tensor], u: dict[str, Tensor]) -> dict[str, float]:
    """Norms of g and u, their cosine and C = gᵀu, over θ_S (``diag/grad/…``) and per module group
    (``diag/module/<group>/…``), in parameter space (P = I)."""
    acc: dict[str, list[float]] = {}
    for name in g:
        gn, un = g[name].double(), u[name].double()
        for key in ("all", module_group(name)):
            a = acc.setdefault(key, [0.0, 0.0, 0.0])
            a[0] += float((gn * gn).sum())
            a[1] += float((un * un).sum())
            a[2] += float((gn * un).sum())
    out = {}
    for key, (gg, uu, gu) in acc.items():
        prefix = "diag/grad" if key == "all" else f"diag/module/{key}"
        out[f"{prefix}/g_norm"] = math.sqrt(gg)
        out[f"{prefix}/u_norm"] = math.sqrt(uu)
        out[f"{prefix}/corr"] = gu
        out[f"{prefix}/cos"] = gu / math.sqrt(gg * uu) if gg > 0 and uu > 0 else math.nan
    return out
