"""python -m data_tools STAGE --in X --out DIR [--workers N] [--shard I/N] [stage options]
python -m data_tools verify DIR
python -m data_tools world --out DIR --videos N --seed S   (procedural clips with known truth)

Stages, in pipeline order: probe, select, filter, normalize, generate, import-generated, pair, encode.
`--in` is a directory of videos, a stage's output directory, or a JSONL manifest.
"""

import argparse
import importlib
import sys

from data_tools.stage import no_inputs, parse_shard, read_inputs, run_stage

STAGES = {  # CLI name -> module
    "probe": "probe",
    "select": "selection",  # not select.py: that would shadow the standard library module
    "filter": "filter",
    "normalize": "normalize",
    "generate": "generate",  # the base model's videos of the GT videos
    "import-generated": "import_generated",
    "pair": "pair",
    "encode": "encode",
}
COMMANDS = {"verify": "verify", "world": "world"}  # not stages: no --in


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, module in STAGES.items():
        p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--in", dest="input", required=True, help="videos directory, stage output or JSONL manifest")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--workers", type=int, default=1, help="worker processes")
        p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                       help="process every N-th input starting at I (SLURM arrays)")
        importlib.import_module(f"data_tools.{module}").add_arguments(p)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(f"data_tools.{module}").add_arguments(p)
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"data_tools.{STAGES.get(args.stage) or COMMANDS[args.stage]}")
    if hasattr(module, "run"):  # a stage over whole manifests rather than one video at a time
        return module.run(args)
    try:
        records, rejects = read_inputs(args.input)
        if not records and not rejects:
            raise ValueError(no_inputs(args.input))
        process = module.make(args)
        return run_stage(args.stage, records, process, args.out, workers=args.workers, shard=args.shard,
                         rejected_inputs=rejects)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"data_tools {args.stage}: {e}")


if __name__ == "__main__":
    main()
