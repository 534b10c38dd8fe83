"""python -m megatron_wan.eval COMMAND [options]

  sample  videos of a test set from the base model and checkpoints, named for VBench's custom-input mode
  rank    rank a values table (method x dimension) into the paper's points and Total_Score
  gsb     GSB scores from Good/Same/Bad annotation files
  vbench  run VBench (custom input) on folders of videos, or parse its results, and rank them
  curves  PNG curves of training metric logs and of per-checkpoint Total_Score
  world   score the procedural world's videos from their pixels (colour, shape, motion, consistency, artifacts)
  experiment  issue 29's experiment on the world: SFT, DPO, Reg-DPO, ... trained from its base, scored, reported
"""

import argparse
import importlib
import sys

COMMANDS = {  # CLI name -> module in megatron_wan.eval with add_arguments(parser) and run(args)
    "sample": "sample",
    "rank": "ranking",
    "gsb": "gsb",
    "vbench": "vbench",
    "curves": "curves",
    "world": "world",
    "experiment": "experiment",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_wan.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module = importlib.import_module(f"megatron_wan.eval.{module}")
        p = sub.add_parser(name, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"megatron_wan.eval.{COMMANDS[args.command]}")
    try:
        return module.run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"megatron_wan.eval {args.command}: {e}")


if __name__ == "__main__":
    main()
