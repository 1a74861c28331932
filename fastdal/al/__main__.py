"""Command line of the active-learning loop.

    python -m fastdal.al run --datasets digits mnist5k --strategies random dynamic-g2 --seeds 3
    python -m fastdal.al experiments        # every experiment of docs/experiments.md
    python -m fastdal.al experiments --quick --out /tmp/al-quick   # the same code paths on tiny sizes

``run`` writes ``rounds.csv`` (one row per run and round), ``table.md`` (mean +- std test accuracy per
round) and ``curves-<dataset>-<model>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import grid
from .data import NAMES
from .loop import LoopConfig, official_gate
from .strategies import STRATEGIES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdal.al", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="a grid of datasets x strategies x seeds")
    run.add_argument("--datasets", nargs="+", default=["digits"], choices=NAMES)
    run.add_argument(
        "--data-dir",
        default=None,
        help="folder of an IDX dataset's four standard files (default: where its package installs them, "
        "/usr/share/datasets/<name>)",
    )
    run.add_argument("--model", default="cnn", choices=grid.MODELS)
    run.add_argument("--strategies", nargs="+", default=["all"], help=f"'all' or some of {list(STRATEGIES)}")
    run.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    run.add_argument("--initial", type=int, default=20)
    run.add_argument("--b", type=int, default=20)
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument("--max-epochs", type=int, default=200)
    run.add_argument("--min-epochs", type=int, default=1, help="train at least this many epochs a round")
    run.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop once more than this many of the round's epochs reached the target training accuracy",
    )
    run.add_argument("--target-accuracy", type=float, default=0.99, help="training accuracy that counts as fit")
    run.add_argument("--balanced-initial", action="store_true", help="draw the initial set evenly over the classes")
    run.add_argument(
        "--official-gate",
        type=int,
        metavar="MIN_EPOCHS",
        default=None,
        help="the paper's code's convergence gate with this minimum (overrides the four options above)",
    )
    run.add_argument("--eval-every", type=int, default=0, help="test accuracy every N epochs too (best in round)")
    run.add_argument("--reinit", action="store_true", help="re-initialize the model every round")
    run.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    run.add_argument("--out", type=Path, default=Path("results/al"))
    experiments = commands.add_parser("experiments", help="regenerate docs/experiments.md and its figures")
    experiments.add_argument("--jobs", type=int, default=None)
    experiments.add_argument(
        "--quick", action="store_true", help="every code path on tiny sizes; the page's copy goes to --out"
    )
    experiments.add_argument("--out", type=Path, default=None, help="results folder (default: docs/experiments)")
    experiments.add_argument("--tables-only", action="store_true", help="rebuild the page from the results in --out")
    experiments.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST's four IDX files (default: /usr/share/datasets/fashion-mnist)"
    )
    args = parser.parse_args(argv)

    if args.command == "experiments":
        from . import experiments as experiments_module

        if args.quick and args.out is None:
            parser.error("--quick needs --out (it never writes into docs/)")
        experiments_module.main(
            out=args.out, jobs=args.jobs, quick=args.quick, tables_only=args.tables_only, data_dir=args.data_dir
        )
        return
    strategies = list(STRATEGIES) if args.strategies == ["all"] else args.strategies
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    config = LoopConfig(
        initial=args.initial,
        b=args.b,
        rounds=args.rounds,
        max_epochs=args.max_epochs,
        min_epochs=args.min_epochs,
        patience=args.patience,
        target_accuracy=args.target_accuracy,
        balanced_initial=args.balanced_initial,
        eval_every=args.eval_every,
        reinit=args.reinit,
    )
    if args.official_gate is not None:
        config = official_gate(config, args.official_gate)
    rows = grid.run_grid(
        grid.tasks(args.datasets, args.model, strategies, range(args.seeds), config, data_dir=args.data_dir), args.jobs
    )
    grid.write_csv(rows, args.out / "rounds.csv")
    (args.out / "table.md").write_text(grid.markdown(rows))
    pictures = grid.plot(rows, args.out)
    print(grid.markdown(rows))
    print(f"written: {args.out / 'rounds.csv'}, {args.out / 'table.md'}, " + ", ".join(str(p) for p in pictures))


if __name__ == "__main__":
    main()
