"""Command line: ``python -m fastdal demo [--labeled 100] [--budget 10] [--seed 0]``."""

import argparse

from . import demo


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdal", description="fastdal: dynamic-AL scores, fast and exact")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="one dynamic-AL query on scikit-learn's digits, and its cost")
    run.add_argument("--labeled", type=int, default=100, help="size of the initial labeled set")
    run.add_argument("--budget", type=int, default=10, help="how many pool samples to select")
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "demo":
        demo.run(labeled=args.labeled, budget=args.budget, seed=args.seed)


if __name__ == "__main__":
    main()
