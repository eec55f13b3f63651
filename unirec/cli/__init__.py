"""The `unirec` command line: one sub-command group per module in this package."""
import argparse
import importlib
import sys

# Each module here exposes `register(subparsers)`; the order is the help order.
COMMAND_MODULES = ("run", "data", "broker", "replay", "pipeline", "features", "model", "train", "report", "serve", "rollout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unirec", description=__doc__)
    parser.add_argument("-c", "--config", default="pipeline.yaml", help="path to pipeline.yaml")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"unirec.cli.{name}").register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
