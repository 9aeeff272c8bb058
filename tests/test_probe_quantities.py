"""The probe as a list of quantities: each owns its keys, runs alone or with the rest to the same numbers, and the
kept gradient graph that serves the geometries' HVPs gives the HVPs a fresh graph gives."""

import fnmatch
import math

import pytest
import torch
from rl_fixtures import make_checkpoint, rl_trainer, with_signal
from theory_problems import SoftmaxPolicy, gen, random_params

from occ_theory.diagnostics.probe import OptimizerSnapshot, ProbeSettings, run_probe
from occ_theory.diagnostics.quantities import QUANTITIES, quantity_names
from occ_theory.theory import grad_and_hvps
from occ_theory.theory.hvp import GradGraph
from occ_theory.theory.params import flatten
from occ_theory.theory.step import decompose_steps


def test_a_kept_gradient_graph_gives_the_gradient_and_the_hvps_of_a_fresh_one():
    prob = SoftmaxPolicy(seed=31)
    vs = [random_params(gen(32 + i), prob.shapes) for i in range(3)]
    g_ref, hv_ref = grad_and_hvps(prob.rl_objective, prob.params, vs, "rev-rev")
    graph = GradGraph.of(prob.rl_objective, prob.params)
    torch.testing.assert_close(flatten(graph.grad), flatten(g_ref), rtol=1e-12, atol=1e-14)
    for v, ref in zip(vs, hv_ref):  # the graph stays for the next direction
        torch.testing.assert_close(flatten(graph.hvp(v)), flatten(ref), rtol=1e-12, atol=1e-14)
    steps = {"one": (vs[0], vs[1]), "two": (vs[2], vs[0])}
    fresh = decompose_steps(prob.rl_objective, prob.params, steps)
    kept = decompose_steps(prob.rl_objective, prob.params, steps, graph=graph)
    for name in steps:
        assert kept[name].alpha_model == pytest.approx(fresh[name].alpha_model, rel=1e-12)
        assert kept[name].beta_model == pytest.approx(fresh[name].beta_model, rel=1e-12)
    graph.close()
    with pytest.raises(RuntimeError, match="closed"):  # never zeros from a graph that is gone
        graph.hvp(vs[0])
    with pytest.raises(ValueError, match="one term"):
        decompose_steps([prob.rl_objective, prob.rl_objective], prob.params, steps, graph=graph)


@pytest.fixture(scope="module")
def probe_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    tr = rl_trainer(make_checkpoint(tmp / "sft"), tmp / "run", "policy", "diag.every=0", "diag.first=false",
                    "rl.grad_clip=0.5")
    batch, _ = tr.rollout()
    first, mb = (with_signal(tr, m) for m in batch.split(2))
    tr.train_step(first, first_after_rollout=True)  # Adam has state: every geometry is measured
    snap = OptimizerSnapshot.capture(tr.optimizer, tr.shared, tr.rc.grad_clip)
    settings = ProbeSettings(dtype="float64", curve_points=5, bootstrap=5, taylor_halvings=1, curve_real_step=True)
    return tr.model, mb, tr.spec, tr.rule(), snap, settings


def test_each_quantity_writes_only_the_keys_it_owns(probe_inputs):
    """Each quantity, run alone, writes only keys its own patterns declare, and no key another quantity writes;
    together they write every key of the full probe (beside the three that say how it ran)."""
    base = {"diag/lr", "diag/dtype", "diag/hvp_method"}
    probe = run_probe(*probe_inputs)
    written = {}
    for q in QUANTITIES:
        if q.name == "realised":  # needs a rule that edits θ_S's update
            continue
        mine = set(run_probe(*probe_inputs, quantities=(q.name,)).record) - base
        assert mine, q.name
        assert not [k for k in mine if not any(fnmatch.fnmatchcase(k, pat) for pat in q.keys)], q.name
        for other, keys in written.items():
            assert not mine & keys, (q.name, other, sorted(mine & keys)[:5])
        written[q.name] = mine
    assert set(probe.record) - base == set().union(*written.values())
    assert set(probe.cost) >= set(quantity_names()) - {"realised"}  # each quantity's line in the cost profile
    assert all(s >= 0 for s in probe.cost.values())


def test_a_quantity_run_alone_gives_the_numbers_it_gives_among_the_others(probe_inputs):
    every = run_probe(*probe_inputs).record
    for name in ("adam_real", "geometries", "real_step"):
        alone = run_probe(*probe_inputs, quantities=(name,)).record
        mine = [k for k in alone if k not in ("diag/lr", "diag/dtype", "diag/hvp_method")]
        assert mine and all(k in every for k in mine)
        for k in mine:
            v = alone[k]
            if isinstance(v, float) and math.isfinite(v):
                assert v == pytest.approx(every[k], rel=1e-9, abs=1e-15), (name, k)
    with pytest.raises(ValueError, match="unknown probe quantities"):
        run_probe(*probe_inputs, quantities=("nope",))


def test_the_local_real_step_grid_stays_local_whatever_lambda_the_run_used(probe_inputs):
    """|λ| ≤ λ_bal, with the λ used as one point of its own: a far λ used never widens the grid the local fit
    describes (it once stretched it to ±1.25·λ_used, past the clip's kinks)."""
    model, mb, spec, coef, snap, settings = probe_inputs
    from dataclasses import replace

    far = replace(coef, value=1e3)
    rec = run_probe(model, mb, spec, far, snap, settings, quantities=("real_step",)).record
    hw, lams = rec["diag/curve_real_local/half_width"], rec["curve/real_local_lams"]
    assert 0 < hw < 1e3 and [x for x in lams if abs(x) > hw * (1 + 1e-9)] == [1e3]
