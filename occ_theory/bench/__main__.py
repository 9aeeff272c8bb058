"""``python -m occ_theory.bench --one NAME --result FILE ...``: one benchmark in this process (what
``occ bench`` starts per benchmark); without ``--one``, the same as ``occ bench``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import argparse
import json
import sys
from pathlib import Path

from . import BENCHMARKS, add_arguments, run, run_one, settings_from


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m occ_theory.bench")
    add_arguments(p)
    p.add_argument("--one", choices=BENCHMARKS, default=None, help="run this benchmark here (internal)")
    p.add_argument("--result", type=Path, default=None, help="with --one: write its result (JSON) here")
    args = p.parse_args(argv)
    if args.one is None:
        return run(args)
    result = run_one(args.one, settings_from(args))
    text = json.dumps(result.to_dict())
    if args.result is None:
        print(text)
    else:
        args.result.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
