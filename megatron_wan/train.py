"""python -m megatron_wan.train --config configs/RECIPE.yaml [key.sub=value ...]   (under torchrun or srun)

SFT, DPO and Reg-DPO of Wan 2.1 (T2V, I2V) on pre-encoded pair shards, with the Megatron-Core engine (TP, CP,
DP) or the DeepSpeed ZeRO-3 engine. Writes OUT/metrics.jsonl (+ TensorBoard), OUT/checkpoints/step_N/,
OUT/flops.json and OUT/summary.json. SIGTERM / SIGUSR1 (SLURM pre-emption) make every rank save and exit;
a re-launch with the same output_dir resumes exactly where it stopped.
"""

import argparse
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_wan import checkpointing, parallel
from megatron_wan.bench.flops import step_flops, video_tokens
from megatron_wan.bench.meters import peak_flops
from megatron_wan.config import Config, ConfigError, accumulation_steps, load_config, validate
from megatron_wan.data.datasets import PairDataset
from megatron_wan.data.samplers import BucketBatchSampler
from megatron_wan.engines import build_engine
from megatron_wan.model import WanModel, preset
from megatron_wan.model.lora import apply_lora
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.objectives.pair_step import Conditions, PairBatch, PairObjective
from megatron_wan.objectives.reference import make_reference
from megatron_wan.run_log import CollapseWatchdog, RunLog

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def build_model(cfg: Config) -> WanModel:
    """The policy: from `model.weights` (diffusers or original layout) or randomly initialized from the preset."""
    m = cfg.model
    runtime = dict(attention_backend=m.attention_backend, cp_comm=m.cp_comm, recompute=m.recompute)
    if m.weights:
        loader = WanModel.from_diffusers if m.layout == "diffusers" else WanModel.from_original
        model = loader(m.weights, **runtime)
    else:
        torch.manual_seed(m.init_seed)  # every rank builds the same weights
        model = WanModel(preset(m.preset, **runtime))
    if model.wan.model_type != cfg.run.task:
        raise ConfigError(f"run.task: {cfg.run.task} but the model ({m.weights or m.preset}) is "
                          f"{model.wan.model_type}")
    return model


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup over `optim.warmup_steps`, then constant or cosine down to `optim.min_lr` at `run.steps`."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.run.steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        run = cfg.run
        parallel.initialize(run.tensor_parallel, run.context_parallel, seed=run.seed)
        validate(cfg, dist.get_world_size())
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")
        self.out = Path(run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.autocast = run.dtype == "bf16"

        model = build_model(cfg).to(self.device)
        if run.finetune == "lora":
            torch.manual_seed(run.seed)  # the same adapters on every rank and in every parallel layout
            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
            if self.autocast:  # frozen base weights in bf16, trainable adapters in fp32
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        self.reference = make_reference(cfg.objective.reference, model) if cfg.objective.mode != "sft" else None
        frozen_copy = self.reference.model if cfg.objective.reference == "copy" and self.reference else None
        self.engine = build_engine(cfg, model, frozen_copy)
        self.wan = model.wan

        self.dataset = PairDataset(cfg.data.dir, cfg.data.pairs, cfg.data.text_len)
        if self.dataset.task != run.task:
            raise ConfigError(f"data.dir: {cfg.data.dir} holds {self.dataset.task} encodings, run.task is {run.task}")
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        ranks = cfg.objective.pair_mode == "ranks" and cfg.objective.mode != "sft"
        self.pair_split = 2 if ranks else 1  # pair_mode ranks: two partner ranks share each pair, one member each
        self.accumulation = accumulation_steps(cfg, dist.get_world_size())
        # each step, this rank's share of the global batch, run as `accumulation` micro-batches of run.batch_size
        self.sampler = BucketBatchSampler(self.dataset.shapes, run.batch_size * self.accumulation,
                                          dp_rank=self.dp_rank // self.pair_split,
                                          dp_size=self.dp_size // self.pair_split, seed=run.seed)
        o = cfg.objective
        self.objective = PairObjective(FlowMatching(o.shift, o.timestep_sampling, seed=run.seed), o.mode, o.beta,
                                       o.sft_weight, o.pair_mode)
        self.step, self.skipped, self.bad_in_row = 0, 0, 0
        self.watchdog = CollapseWatchdog(run.collapse_gap, run.collapse_steps)
        self.stop_requested = False
        self.ckpt_root = self.out / "checkpoints"
        resume_from = checkpointing.latest(self.ckpt_root) if run.resume else None
        if resume_from:
            trainer_state, rank_state = checkpointing.load(resume_from, self.engine)
            self.step, self.skipped = trainer_state["step"], trainer_state["skipped"]
            self.sampler.load_state_dict(trainer_state["sampler"])  # global: resumes on any data-parallel size
            if rank_state:  # None when resumed on another world size (no RNG stream is used by a step)
                checkpointing.set_rng_state(rank_state["rng"])
        self.resumed_from = str(resume_from) if resume_from else None
        self.batches = iter(self.sampler)
        self.peak, self.peak_source = peak_flops(torch.bfloat16 if self.autocast else torch.float32)
        self.log = None
        if self.rank == 0:
            self.log = RunLog(self.out, resume_step=self.step, tensorboard=run.tensorboard,
                              wandb_project=run.wandb_project, config=cfg.to_dict())
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    # -- one step ----------------------------------------------------------------------------------

    def _next_indices(self) -> list[int]:
        try:
            return next(self.batches)
        except StopIteration:  # the sampler has moved on to the next epoch
            self.batches = iter(self.sampler)
            return next(self.batches)

    def _batch(self, indices) -> PairBatch:
        items = [self.dataset[i] for i in indices]

        def stack(name):
            return torch.stack([it[name] for it in items]).to(self.device, torch.float32)

        i2v = self.dataset.task == "i2v"
        conditions = Conditions(stack("text_emb"), stack("clip_emb") if i2v else None,
                                stack("cond_latent") if i2v else None)
        lose = stack("loser_latent") if self.cfg.objective.mode != "sft" else None
        return PairBatch(stack("winner_latent"), lose, conditions, list(indices))

    def _mean_over_dp(self, metrics: dict) -> dict:
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        return {n: v / self.dp_size for n, v in zip(names, values.tolist())}

    def _flops(self, grid, pairs: int) -> dict:
        """FLOPs of one step of this data-parallel rank (`pairs` pairs of latent `grid`), by part."""
        lora_rank = self.cfg.lora.rank if self.cfg.run.finetune == "lora" else 0
        parts = step_flops(self.wan, tuple(grid), self.cfg.data.text_len, pairs, self.cfg.objective.mode,
                           self.cfg.objective.pair_mode, lora_rank, self.wan.recompute)
        return {k: v / self.pair_split for k, v in parts.items()}

    def _backward(self, loss):
        self.engine.backward(loss / self.accumulation)  # the optimizer step's loss: the mean over micro-batches

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        indices, size = self._next_indices(), self.cfg.run.batch_size
        micro = [indices[i:i + size] for i in range(0, len(indices), size)]
        self.engine.begin_step(self.accumulation * self.objective.backward_passes(size))
        outs = []
        for chunk in micro:
            batch = self._batch(chunk)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                outs.append(self.objective.step(self.engine.model, self.reference, batch, self.step,
                                                backward=self._backward).metrics)
        lr = learning_rate(self.step, self.cfg)
        grad_norm, stepped = self.engine.step(lr)
        local = {k: sum(m[k] for m in outs) / len(outs) for k in outs[0]}
        stepped = stepped and math.isfinite(local["loss"])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            if self.cfg.run.empty_cache:
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        metrics = self._mean_over_dp(local)
        flops = self._flops(batch.win.shape[2:], len(indices))["total"]
        pairs = len(indices) * self.dp_size // self.pair_split
        videos = pairs * (1 if self.cfg.objective.mode == "sft" else 2)
        per_device = flops / (self.cfg.run.tensor_parallel * self.cfg.run.context_parallel) / seconds
        metrics.update(lr=lr, grad_norm=grad_norm, step_time=seconds, samples_per_s=pairs / seconds,
                       tokens_per_s=videos * video_tokens(self.wan, batch.win.shape[2:]) / seconds,
                       tflops=flops * self.dp_size / seconds / 1e12, mfu=per_device / self.peak,
                       peak_memory_gb=_peak_memory_gb(), skipped=int(not stepped))
        return metrics

    # -- the run -----------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame):
        self.stop_requested = True
        print(f"rank {self.rank}: {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
              file=sys.stderr, flush=True)

    def _agreed_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self) -> None:
        state = {"step": self.step, "skipped": self.skipped, "config": self.cfg.to_dict(),
                 "world_size": dist.get_world_size(), "sampler": self.sampler.state_dict()}
        rank_state = {"rng": checkpointing.rng_state()}
        checkpointing.save(self.ckpt_root, self.step, self.engine, state, rank_state, self.cfg.run.keep_last)

    def _write_flops(self) -> None:
        grid = self.dataset.shapes[0][1:]
        parts = self._flops(grid, self.cfg.run.batch_size * self.accumulation)
        (self.out / "flops.json").write_text(json.dumps({
            "per_data_parallel_rank_step": parts, "latent_grid": list(grid), "text_len": self.cfg.data.text_len,
            "peak_flops_per_device": self.peak, "peak_source": self.peak_source}, indent=1))
        print(f"FLOPs per step and data-parallel rank at latent grid {list(grid)}: {parts['total']:.4g} "
              f"({', '.join(f'{k} {v:.3g}' for k, v in parts.items() if k != 'total')}); "
              f"peak {self.peak:.3g} FLOP/s ({self.peak_source})")

    def run(self) -> dict:
        """Train to `run.steps` (or until a stop signal); returns the summary."""
        run = self.cfg.run
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        if self.rank == 0:
            self._write_flops()
        bar = tqdm(total=run.steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0,
                   file=sys.stderr)
        last, started, first_step = {}, time.perf_counter(), self.step
        try:
            while self.step < run.steps:
                metrics = self.train_step()
                self.step += 1
                if metrics["skipped"]:
                    self.skipped += 1
                    self.bad_in_row += 1
                    if self.bad_in_row >= run.max_bad_steps:
                        raise RuntimeError(f"step {self.step}: {self.bad_in_row} non-finite steps in a row "
                                           f"(loss {metrics['loss']}, grad norm {metrics['grad_norm']}); aborting")
                else:
                    self.bad_in_row = 0
                self.watchdog.update(self.step, metrics)
                last = metrics
                if self.log and self.step % run.log_every == 0:
                    self.log.log(self.step, metrics)
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", dgr=f"{metrics.get('dgr', 0):.3g}")
                stop = self._agreed_stop()
                if stop or self.step % run.save_every == 0 or self.step == run.steps:
                    self.save()
                if stop:
                    break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        summary = {"steps": self.step, "steps_this_launch": self.step - first_step, "skipped": self.skipped,
                   "collapse_warnings": self.watchdog.warned, "interrupted": self.step < run.steps,
                   "resumed_from": self.resumed_from, "seconds": time.perf_counter() - started,
                   "last": last, "output_dir": str(self.out)}
        if self.log:
            self.log.close()
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            state = "stopped by signal" if summary["interrupted"] else "done"
            print(f"train: {state} at step {self.step}/{run.steps}, {self.skipped} skipped, "
                  f"{summary['seconds']:.1f} s; last loss {last.get('loss', float('nan')):.5g} -> {self.out}")
        return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m megatron_wan.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values), e.g. run.steps=10")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(f"megatron_wan.train: {e}")
    return trainer.run()


if __name__ == "__main__":
    main()
