"""``ProbeContext``: what every probe quantity reads, computed once per probe (Cockpit's pattern, with the data loop
apart from the quantities, as curvlinops keeps it apart from its operators).

It holds the model in the probe's precision, the minibatch and its row chunks, the token counts J and M are
normalised by, the reductions over processes, θ_S and θ_M, the objectives as functions of a parameter dict, and,
computed on first use and cached: g = ∇J and u = ∇M on θ_S with ‖∇_{θ_M}M‖², the geometries' step forms, and
the real step's Taylor model. A distributed backend has one seam here: ``Reductions`` (and, for a sharded model,
how θ_S is gathered before ``work`` sees it).

Cost: ``directions`` runs one forward pass for J and M together; u (with θ_M's gradient) comes from one backward
and g from another that keeps its graph, and, on one row chunk with ``rev-rev`` HVPs, that graph then serves every
geometry's HVP (``theory.hvp.GradGraph``). With row chunks each chunk is differentiated in turn (g and u first,
the HVPs in a second pass), so that one chunk's activations are alive at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..models import exact_float64
from ..rl.batch import Norms, ObjectiveSpec, RLBatch, compute_objectives, forward_logprobs
from ..rl.coef import Coefficient
from ..theory import eager_attention, grad
from ..theory.hvp import GradGraph
from ..theory.params import sq_norm

Reduce = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Reductions:
    """Sums and gathers over processes (None on one process: every quantity is then the local one)."""

    sum: Reduce | None = None
    """Sums a dict of tensors (gradients, HVP dot products, objective values) over processes."""
    gather: Reduce | None = None
    """Concatenates per-sequence terms over processes (rank order)."""
    sum_terms: Reduce | None = None
    """Sums the log-prob proxies' terms (the max of keys ending in ``max_abs``)."""

    @classmethod
    def of(cls, dist: Any) -> Reductions:
        if dist is None or not dist.active:
            return cls()
        return cls(dist.sum, dist.gather_cat, dist.sum_terms)

    def red(self, d: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.sum(d) if self.sum is not None else d


def cast(batch: RLBatch | None, dtype: torch.dtype) -> RLBatch | None:
    if batch is None:
        return None
    return RLBatch(**{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.tensors().items()})


def row_chunks(batch: RLBatch, rows: int) -> list[RLBatch]:
    """``batch`` as consecutive blocks of at most ``rows`` rows, every column kept (``rows`` = 0: the batch itself)."""
    if rows <= 0 or rows >= batch.size:
        return [batch]
    return [batch.select(slice(i, i + rows)) for i in range(0, batch.size, rows)]


def summed_grad(terms: list, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """∇ of the sum of scalar functions ``terms`` (row chunks of one objective), one backward pass at a time."""
    total = grad(terms[0], params)[1]
    for f in terms[1:]:  # out of place: autograd may return one tensor (or a broadcast view) for several inputs
        total = {k: total[k] + t for k, t in grad(f, params)[1].items()}
    return total


@dataclass(eq=False)
class Directions:
    """g = ∇J and u = ∇M on θ_S (reduced over processes), ‖∇_{θ_M}M‖², and J's kept gradient graph when one serves."""

    g: dict[str, Tensor]
    u: dict[str, Tensor]
    mtp_grad_sq: float
    graph: GradGraph | None = None


@dataclass(eq=False)
class ProbeContext:
    """One probe's inputs and the intermediates its quantities share (see the module docstring)."""

    work: nn.Module
    """The model in the probe's precision, in eval mode."""
    batch: RLBatch
    spec: ObjectiveSpec
    coef: Coefficient
    optim: Any  # probe.OptimizerSnapshot
    settings: Any  # settings.ProbeSettings
    dtype: torch.dtype
    reductions: Reductions = field(default_factory=Reductions)
    heldout: RLBatch | None = None
    realised: tuple[float, float] | None = None
    cost: dict[str, float] = field(default_factory=dict)
    """Seconds per quantity and per shared intermediate: the probe's cost profile (``perf/probe/<name>_s``)."""
    cache: dict[str, Any] = field(default_factory=dict)
    _nested: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.batch, self.heldout = cast(self.batch, self.dtype), cast(self.heldout, self.dtype)
        shared, own = set(self.work.shared_param_names()), set(self.work.mtp_param_names())
        named = list(self.work.named_parameters())
        self.params = {k: p.detach() for k, p in named if k in shared}
        self.mtp_params = {k: p.detach() for k, p in named if k in own}
        self.mask = self.batch.response_mask
        self.chunks = row_chunks(self.batch, self.settings.row_chunk)
        sums = self.reductions.sum
        # the token counts J and M are normalised by: global ones in data parallelism, the batch's own for chunks
        self.norms = Norms.of(self.batch, self.work.num_mtp, sums) if sums is not None or len(self.chunks) > 1 \
            else None

    # ---------------------------------------------------------------- objectives as functions of parameters

    @property
    def lr(self) -> float:
        return self.optim.lr

    @property
    def lam_used(self) -> float:
        return self.coef.value

    def J_of(self, part: RLBatch) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: compute_objectives(self.work, part, self.spec, params=p, with_mtp=False,
                                            norms=self.norms).rl_objective

    def M_of(self, part: RLBatch) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: compute_objectives(self.work, part, self.spec, params=p, norms=self.norms).mtp

    def logp_of(self, part: RLBatch) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: forward_logprobs(self.work, part, self.spec.temperature, self.spec.grad_cut, False, p)[0]

    @property
    def J(self) -> Callable[[dict[str, Tensor]], Tensor]:
        return self.J_of(self.batch)

    @property
    def M(self) -> Callable[[dict[str, Tensor]], Tensor]:
        return self.M_of(self.batch)

    @property
    def J_terms(self) -> list[Callable]:
        return [self.J_of(c) for c in self.chunks]

    @property
    def logp_terms(self) -> list[Callable]:
        return [self.logp_of(c) for c in self.chunks]

    def seq_terms(self, p: dict[str, Tensor]) -> Tensor:
        """Per-sequence terms of J (for the bootstrap over sequences), un-normalised."""
        return compute_objectives(self.work, self.batch, self.spec, params=p, with_mtp=False).seq_rl

    # ---------------------------------------------------------------- numerics

    def curvature(self) -> contextlib.AbstractContextManager:
        """Second-order and forward-mode differentiation: eager attention; in float64 also RMSNorm and the softmax in
        float64 (transformers computes them in float32)."""
        return exact_float64(self.work) if self.dtype == torch.float64 else eager_attention(self.work)

    def evaluation(self) -> contextlib.AbstractContextManager:
        """Evaluating J only: the fused attention kernels serve (float32)."""
        return exact_float64(self.work) if self.dtype == torch.float64 else contextlib.nullcontext()

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Charge the time inside to ``name``, exclusive of what nested ``timed`` blocks charge to theirs (a shared
        intermediate is charged to itself, not to the quantity that first asked for it)."""
        self._nested.append(0.0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            inner = self._nested.pop()
            self.cost[name] = self.cost.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed

    # ---------------------------------------------------------------- shared intermediates

    def objectives(self) -> Any:
        """The objectives at θ, detached (the log-prob proxies read them): the forward pass of ``directions`` where it
        ran on the whole batch, else one of their own without gradients."""
        if "objectives" not in self.cache:
            with self.timed("objectives"), torch.no_grad():
                self.cache["objectives"] = compute_objectives(self.work, self.batch, self.spec)
        return self.cache["objectives"]

    def directions(self) -> Directions:
        """g, u and ‖∇_{θ_M}M‖² (see the module docstring for what one forward and two backward passes give)."""
        if "directions" in self.cache:
            return self.cache["directions"]
        red = self.reductions.red
        with self.timed("directions"), self.curvature():
            if len(self.chunks) == 1 and self.settings.hvp_method == "rev-rev":
                leaves = {k: t.clone().requires_grad_(True) for k, t in (self.params | self.mtp_params).items()}
                with torch.enable_grad():
                    obj = compute_objectives(self.work, self.batch, self.spec, params=leaves, norms=self.norms)
                    grads = torch.autograd.grad(obj.mtp, list(leaves.values()), retain_graph=True,
                                                allow_unused=True, materialize_grads=True)
                    u_all = red({k: t.detach() for k, t in zip(leaves, grads)})
                    graph = GradGraph(obj.rl_objective, {k: leaves[k] for k in self.params})
                # the same forward serves the log-prob proxies (only what they read is kept)
                self.cache["objectives"] = SimpleNamespace(logp=obj.logp.detach(),
                                                           mtp_logp=[q.detach() for q in obj.mtp_logp])
                g = red(graph.grad)
            else:  # row chunks (or fwd-rev HVPs): g and u chunk by chunk; the HVPs make their own graphs
                u_all = red(summed_grad([self.M_of(c) for c in self.chunks], self.params | self.mtp_params))
                g, graph = red(summed_grad(self.J_terms, self.params)), None
            u = {k: u_all[k] for k in self.params}
            mtp_sq = float(sq_norm({k: u_all[k] for k in self.mtp_params})) if self.mtp_params else 0.0
        self.cache["directions"] = Directions(g, u, mtp_sq, graph)
        return self.cache["directions"]

    def release_graph(self) -> None:
        """Drop J's kept gradient graph once the geometries' HVPs are done."""
        d = self.cache.get("directions")
        if d is not None and d.graph is not None:
            d.graph.close()
            d.graph = None
