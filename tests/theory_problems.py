"""Small float64 problems with known structure, shared by the theory tests."""

from __future__ import annotations

import torch
from torch import Tensor

from occ_theory.theory.params import Params, flatten, unflatten

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_params(g: torch.Generator, shapes: dict[str, tuple[int, ...]], scale: float = 1.0) -> Params:
    return {k: scale * torch.randn(s, generator=g, dtype=DT) for k, s in shapes.items()}


def symmetric(g: torch.Generator, n: int, kind: str) -> Tensor:
    """A random symmetric matrix: 'indefinite', 'negdef' (negative definite) or 'posdef'."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    mag = 0.5 + torch.rand(n, generator=g, dtype=DT)
    if kind == "negdef":
        eig = -mag
    elif kind == "posdef":
        eig = mag
    elif kind == "indefinite":
        eig = mag * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)
    else:
        raise ValueError(kind)
    return q @ torch.diag(eig) @ q.T


def flat_grad(f, params: Params) -> Tensor:
    """∇f over the flattened params, by ``torch.func.grad`` on one flat vector: a brute-force reference."""
    return torch.func.grad(lambda x: f(unflatten(x, params)))(flatten(params))


def flat_grad_and_hessian(f, params: Params) -> tuple[Tensor, Tensor]:
    """``(∇f, ∇²f)`` over the flattened params, by ``torch.func`` on one flat vector: the brute-force
    reference the helpers over parameter dicts are checked against."""
    return flat_grad(f, params), torch.func.hessian(lambda x: f(unflatten(x, params)))(flatten(params))


def fd_gradient(f, params: Params, eps: float = 1e-6) -> Tensor:
    """∇f over the flattened params by central differences, one coordinate at a time (small models)."""
    x = flatten(params)
    out = torch.empty_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = eps
        out[i] = (f(unflatten(x + e, params)) - f(unflatten(x - e, params))) / (2 * eps)
    return out


class Quadratic:
    """f(θ) = c + aᵀθ + ½ θᵀAθ over a parameter dict, with its exact gradient and Hessian."""

    def __init__(self, like: Params, a: Tensor, hess: Tensor, c: float = 0.0):
        self.like, self.a, self.hess, self.c = like, a, hess, c

    def __call__(self, params: Params) -> Tensor:
        x = flatten(params)
        return self.c + self.a @ x + 0.5 * x @ (self.hess @ x)

    def grad(self, params: Params) -> Params:
        return unflatten(self.a + self.hess @ flatten(params), self.like)


def quadratic(g: torch.Generator, like: Params, kind: str) -> Quadratic:
    n = sum(t.numel() for t in like.values())
    return Quadratic(like, torch.randn(n, generator=g, dtype=DT), symmetric(g, n, kind), c=0.3)


class SoftmaxPolicy:
    """A one-layer softmax policy over V tokens with a tanh feature layer (smooth, non-quadratic).

    logp(θ)[i, t] = log π_θ(y[i, t] | x[i, t]); J is the DAPO clipped surrogate against fixed old
    log-probs; M is the log-likelihood of a second set of targets (a stand-in for an MTP head that
    shares every parameter).
    """

    def __init__(self, seed: int = 0, batch: int = 6, length: int = 5, dim: int = 4, hidden: int = 5, vocab: int = 7):
        g = gen(seed)
        self.shapes = {"w1": (dim, hidden), "b1": (hidden,), "w2": (hidden, vocab), "b2": (vocab,)}
        self.params = random_params(g, self.shapes, scale=0.7)
        self.x = torch.randn(batch, length, dim, generator=g, dtype=DT)
        self.y = torch.randint(0, vocab, (batch, length), generator=g)
        self.y2 = torch.randint(0, vocab, (batch, length), generator=g)
        self.mask = (torch.rand(batch, length, generator=g) > 0.2).to(DT)
        self.adv = torch.randn(batch, generator=g, dtype=DT)
        # old log-probs: most ratios near 1, a few far outside the clip range (clip active, smooth there)
        jitter = 0.05 * torch.randn(batch, length, generator=g, dtype=DT)
        far = torch.rand(batch, length, generator=g) < 0.15
        jitter = torch.where(far, torch.sign(jitter) * 0.8, jitter)
        self.old = self.logp(self.params).detach() - jitter
        self.eps_lo, self.eps_hi = 0.2, 0.28

    def logits(self, p: Params) -> Tensor:
        h = torch.tanh(self.x @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]  # (B, T, V)

    def logp(self, p: Params) -> Tensor:
        return torch.log_softmax(self.logits(p), -1).gather(-1, self.y[..., None]).squeeze(-1)

    def rl_objective(self, p: Params) -> Tensor:
        ratio = torch.exp(self.logp(p) - self.old)
        a = self.adv[:, None]
        surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - self.eps_lo, 1 + self.eps_hi) * a)
        return (surr * self.mask).sum() / self.mask.sum()

    def mtp_objective(self, p: Params) -> Tensor:
        lp2 = torch.log_softmax(self.logits(p), -1).gather(-1, self.y2[..., None]).squeeze(-1)
        return (lp2 * self.mask).sum() / self.mask.sum()
