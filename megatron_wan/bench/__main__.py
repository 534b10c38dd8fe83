"""python -m megatron_wan.bench SUITE [options]: one entry for the benchmarks (`SUITE --help` for each).

    sweep              training setups side by side (engine, pair_mode, CP, recompute, reference): table + chart
    mfu                MFU of a compute-bound step in fp32 and bf16, ours vs diffusers' WanTransformer3DModel
                       (--compile: and with model.compile)
    compile_time       compile seconds of one Wan block under model.compile at a preset's 480p latent grid
    plan               memory and throughput planner for the real presets on H100 / H200
    fsdp_memory        exact bytes per rank of parameters, gradients, optimizer state at run.dp_shard 1/2/4
    activation_memory  bytes saved for backward per rank under CP 1/2/4; ring vs Ulysses step time
    pair_modes         sequential vs batched pairs, Reg-DPO vs SFT step cost
    shard_read         random-access reads of our shards vs a folder of torch.save files
    loader             step time with DataLoader workers vs inline reading, 720p latents read cold
    stability          vanilla DPO vs Reg-DPO training curves (needs a tiny model folder and its encoded data)
    gpu_check          the acceptance check of every CUDA-only path on the first GPU machine (exit code: failures)
"""

import importlib
import sys

from megatron_wan.suites import SUITES


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    suite, rest = argv[0].replace("-", "_"), argv[1:]
    if suite not in SUITES:
        sys.exit(f"python -m megatron_wan.bench: unknown suite {argv[0]!r}; expected one of {', '.join(SUITES)}")
    result = importlib.import_module(f"megatron_wan.bench.{suite}").main(rest)
    if suite == "gpu_check":
        sys.exit(result)  # the number of failed steps
    return result


if __name__ == "__main__":
    main()
