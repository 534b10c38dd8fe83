"""experiment: the CLI name of launch.experiment (issue 29), which runs the data stages, the trainer, the export,
the sampler and these metrics in order. It lives under launch/ because it drives data_tools, which nothing in
megatron_wan may import; this module only hands it the command line (launch.experiment loads nothing heavy)."""


def add_arguments(parser):
    from launch.experiment import add_arguments

    add_arguments(parser)


def run(args):
    from launch.experiment import run

    return run(args)
