"""``dist.strategy: fsdp``: the model sharded with PyTorch's FSDP2 (``fully_shard``) over the ``torchrun`` processes.

What is sharded: ``fully_shard`` on each trunk decoder layer, each MTP module's decoder block and the root (the
root's group holds the embeddings, the final norm, the output head, tied or not, and the MTP modules' norms and
projection: an ``MTPModule`` has no ``forward`` of its own, its parts are called one by one, so they cannot be a
group of their own). Weights, gradients and the AdamW state are then split over the processes (each holds about
1/world of them); the training forward and backward all-gather each group's weights in turn and reduce-scatter its
gradients.

The trainer's numbers do not depend on the strategy:

* FSDP2 averages gradients over processes (reduce-scatter with MEAN); the toolkit's loss on each process is a term of
  the global objective (J and M normalised by the global token counts), whose gradient is the *sum* of the
  processes' terms. Every FSDP module's gradient divide factor is set to 1 once, in ``shard_model`` (with SUM as the
  collective's op: the PREMUL_SUM FSDP2 picks for float32 otherwise is NCCL's alone): the reduce-scatter then sums,
  and the sharded ``.grad`` holds the global gradient, as ``Dist.sum_grads`` gives it under ddp.
* u = ∇M on θ_S from the live step: autograd cannot differentiate w.r.t. the sharded parameters
  (pytorch/pytorch#172543), so ``mtp_grad`` runs a backward pass of M first (graph kept, as the recorder's
  ``autograd.grad`` does) and reads the reduce-scattered ``.grad``; the training backward follows on the same graph.
* Everything that differentiates the model functionally (the probe, the ``real``, ``adam_step`` and ``fisher``
  rules) or reads weights by hand (the sampler's decoder, the evaluation, ``save_model``) gets a plain, unwrapped
  copy of the model with the full parameters (``FullView``), and the optimizer's state in full: the same inputs as
  under ddp, so the same code gives the same numbers, with the ddp reductions (``Dist.sum`` over the local terms,
  once). The copy is built from a skeleton kept at wrapping time (parameters on the meta device, buffers real), so
  no full copy lives between uses.
* The clip's norms are sums of the local shards' squares over processes (``grad_norm``), in every ``rl.clip_scope``.

Why a plain copy and not DTensor leaves (the ``redistribute(Replicate).to_local(grad_placements=[Partial()])``
gather inside the loss): that trick differentiates correctly (``test_fsdp.py`` checks it, and that leaving
``Partial()`` out drops the other processes' data), but its gradients, and every θ_S-sized direction built from
them, are sharded DTensors, which ``occ_theory.theory`` cannot take: ``float()`` of a reduction over a sharded
DTensor returns this process's partial value without a word (measured, torch 2.13), and forward-mode AD and
``flatten`` have no sharding rules. So the probe holds θ_S and its directions in full on every process.

Memory under fsdp, per process (P = parameters, S = θ_S, in the model's dtype unless said):

* loading: P (every process reads the checkpoint in full, then keeps its shard; initialising on the meta device and
  loading on rank 0 alone would avoid it);
* training: ≈ (P + P grads + 2P AdamW state) / world, plus one layer group unsharded at a time (the root's group, with
  the embeddings and the head, for the whole forward) and the activations of the process's rows;
* a rollout or an evaluation: + P (the plain copy, freed after);
* a step whose rule differentiates the model (real, adam_step, fisher) or a probe step: + P (copy) + 2S (exp_avg,
  exp_avg_sq in full), plus what the probe holds as on one process (its directions, the copy in the probe's dtype
  when that differs, the graphs bounded by ``diag.row_chunk`` and ``diag.jvp_batch``);
* the recorder (runs that track momentum or whose rule needs u): u, the received gradient and the momentum buffers
  m_g, m_u in full (S each).

Where the probe does not fit, ``diag.bundle_only: true`` writes the bundle without probing online: rank 0 alone
gathers it, into host memory (one tensor at a time on the device), and ``occ probe RUN`` recomputes it on one
large device.

Checkpoints hold the full state, gathered on rank 0, in the ddp format (``model_state``, ``optimizer_state``): one
checkpoint format, resumable under either strategy with the same number of processes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..diagnostics.recorder import wide
from .dist import Dist, FullView


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` on each trunk decoder layer, each MTP module's block and the root (in place), every FSDP
    module's gradients *summed* over processes (divide factor 1: see the module docstring)."""
    for layer in model.trunk.base_model.layers:
        fully_shard(layer, mesh=mesh)
    for module in model.mtp:
        fully_shard(module.block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a plain SUM: for float32 gradients FSDP2 would otherwise reduce with PREMUL_SUM(1/factor), which gloo lacks
            module.set_force_sum_reduction_for_comms(True)
    return model


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory) and whose buffers are real (the rotary
    tables): what ``materialize`` fills. Tied parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(template: nn.Module, tensors: dict[str, Tensor]) -> nn.Module:
    """A plain module of ``template``'s structure whose parameters are ``tensors`` (by name; tied ones once, under
    the name ``named_parameters`` gives them), buffers copied from the template."""
    memo = {id(p): nn.Parameter(tensors[name], requires_grad=p.requires_grad)
            for name, p in template.named_parameters()}
    out = copy.deepcopy(template, memo)
    device = next(iter(tensors.values())).device
    return out.to(device)  # the buffers follow the parameters


def full_tensor(t: Tensor) -> Tensor:
    """``t`` in full: a sharded DTensor all-gathered (a collective: every process must call it), a plain tensor as
    it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: Tensor) -> Tensor:
    """This process's shard of ``t`` (the tensor itself when it is not a DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


class Sharded:
    """The fsdp strategy: the model sharded with FSDP2; full views gathered where a computation needs the whole
    model (see the module docstring). Every method that gathers is a collective: all processes call it."""

    name = "fsdp"

    def __init__(self, dist: Dist):
        if not tdist.is_initialized():
            raise ValueError("dist.strategy fsdp needs a process group: launch with torchrun")
        self.dist = dist
        self.mesh = init_device_mesh(dist.device.type, (tdist.get_world_size(),))
        self._templates: dict[int, nn.Module] = {}

    def wrap(self, model: nn.Module, *, template: bool = True) -> nn.Module:
        """Shard ``model`` in place (keeping its skeleton for ``full_model`` when ``template``)."""
        if template:
            self._templates[id(model)] = skeleton(model)
        return shard_model(model, self.mesh)

    # ---------------------------------------------------------------- gradients

    def reduce_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Nothing to do: the backward's reduce-scatter summed them."""

    def full_grads(self, named: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """The gradient of each parameter in full (zeros where it has none)."""
        return {k: full_tensor(p.grad.detach()) if p.grad is not None else
                torch.zeros(p.shape, dtype=p.dtype, device=p.device) for k, p in named.items()}

    def set_grads(self, named: dict[str, nn.Parameter], grads: dict[str, Tensor]) -> None:
        """Replace each parameter's gradient by the full tensor given (each process keeps its own shard of it)."""
        for k, p in named.items():
            p.grad = distribute_tensor(grads[k].to(p.dtype), self.mesh, p.placements, src_data_rank=None)

    def grad_norm(self, params: Iterable[nn.Parameter]) -> Tensor:
        """The global 2-norm of the gradients (local shards' squares summed over processes; 0 without any)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for p in params:
            if p.grad is not None:
                sq = sq + local(p.grad.detach()).double().pow(2).sum()
        tdist.all_reduce(sq)
        return sq.sqrt().cpu()

    def clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """``clip_grad_norm_`` over sharded gradients: scale them by ``max_norm / (norm + 1e-6)`` when below 1;
        returns the norm before clipping."""
        norm = self.grad_norm(params)
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
        return norm

    def all_finite(self, params: Iterable[nn.Parameter]) -> bool:
        """Whether every parameter is finite, on every process (they agree)."""
        bad = any(not bool(torch.isfinite(local(p.detach())).all()) for p in params)
        return not self.dist.max(int(bad))

    def mtp_grad(self, objective: Tensor | None, recorder: Any) -> dict[str, Tensor]:
        """u = ∇M on θ_S (full, at least float32 as the recorder keeps it) of the global batch, by a backward pass of M that
        keeps the graph for the training backward (the gradients are cleared after); ‖∇_{θ_M}M‖² goes to
        ``recorder.mtp_grad_sq`` as ``GradientRecorder.mtp_grad`` leaves it."""
        shared, mtp = dict(zip(recorder.names, recorder.params)), recorder.mtp_params
        params = [*shared.values(), *mtp]
        if objective is None or not objective.requires_grad:
            recorder.mtp_grad_sq = 0.0
            return {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in shared.items()}
        for p in params:
            p.grad = None
        objective.backward(retain_graph=True)
        u = {k: wide(v) for k, v in self.full_grads(shared).items()}
        recorder.mtp_grad_sq = float(self.grad_norm(mtp)) ** 2 if mtp else 0.0
        for p in params:
            p.grad = None
        return u

    # ---------------------------------------------------------------- full views

    @contextlib.contextmanager
    def full_model(self, model: nn.Module, *, main_only: bool = False) -> Iterator[nn.Module | None]:
        """A plain copy of ``model`` with its full parameters, in ``model``'s train/eval mode, freed on exit.
        ``main_only``: only rank 0 gets it, in host memory (the others None); every process gathers."""
        keep = self.dist.main or not main_only
        tensors = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                t = p.detach()
                t = t.full_tensor() if isinstance(t, DTensor) else t.clone()  # never the live storage
                if keep:
                    tensors[name] = t.cpu() if main_only else t
                del t
        if not keep:
            yield None
            return
        plain = materialize(self._templates[id(model)], tensors)
        plain.train(model.training)
        del tensors
        yield plain

    def full_optimizer(self, optimizer: torch.optim.Optimizer, sharded: dict[str, nn.Parameter],
                       full: dict[str, Tensor], *, keep: bool = True, host: bool = False
                       ) -> torch.optim.Optimizer | None:
        """An optimizer of ``optimizer``'s type and hyperparameters over the ``full`` tensors, holding the state of
        the ``sharded`` parameters (by name) in full (in host memory with ``host``). ``keep`` False: gather only (a
        process that drops it)."""
        state = {}
        for k, p in sharded.items():
            st = optimizer.state.get(p, {})
            gathered = {key: full_tensor(v) if isinstance(v, Tensor) else v for key, v in st.items()}
            state[k] = {key: v.cpu() if host and isinstance(v, Tensor) else v for key, v in gathered.items()}
        if not keep:
            return None
        group = optimizer.param_groups[0]
        opt = type(optimizer)(list(full.values()), lr=group["lr"])
        opt.param_groups[0].update({key: v for key, v in group.items() if key != "params"})
        for k, t in full.items():
            if state[k]:
                opt.state[t] = state[k]
        return opt

    @contextlib.contextmanager
    def full_view(self, model: nn.Module, optimizer: torch.optim.Optimizer, shared: dict[str, nn.Parameter], *,
                  main_only: bool = False) -> Iterator[FullView | None]:
        """The plain copy of ``model``, its θ_S by name and the optimizer's state on ``shared`` (the trainer's θ_S,
        the optimizer's own parameter objects) in full (``FullView``)."""
        with self.full_model(model, main_only=main_only) as plain:
            keep = plain is not None
            full = {k: p for k, p in plain.named_parameters() if k in shared} if keep else {}
            opt = self.full_optimizer(optimizer, shared, full, keep=keep, host=main_only)
            yield FullView(plain, full, opt) if keep else None

    # ---------------------------------------------------------------- checkpoints

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The full state dict on rank 0, on the host (the others get {})."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()``'s format (state by parameter index) with full tensors, on rank 0, on the host
        (the others get {})."""
        sd = optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                v = full_tensor(v) if isinstance(v, Tensor) else v  # a collective: every process gathers
                if self.dist.main:
                    state.setdefault(i, {})[k] = v.cpu() if isinstance(v, Tensor) else v
        return {"state": state, "param_groups": sd["param_groups"]} if self.dist.main else {}

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Tensor],
                   optim_sd: dict[str, Any]) -> None:
        """Load a full state (``model_state``, ``optimizer_state``; every process reads the file) into the shards."""
        set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, st in optim_sd["state"].items():
            p = params[int(i)]
            state[i] = {k: self._shard_like(v, p) if k != "step" and isinstance(v, Tensor) else v for k, v in st.items()}
        optimizer.load_state_dict({"state": state, "param_groups": optim_sd["param_groups"]})

    def _shard_like(self, full: Tensor, p: Tensor) -> Tensor:
        if not isinstance(p, DTensor):
            return full
        return distribute_tensor(full.to(device=p.device, dtype=p.dtype), self.mesh, p.placements, src_data_rank=None)
