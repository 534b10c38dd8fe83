"""python -m megatron_wan.train --config configs/RECIPE.yaml [key.sub=value ...]   (under torchrun or srun)

SFT, DPO and Reg-DPO of Wan 2.1 (T2V, I2V) on pre-encoded pair shards, with the Megatron-Core engine (TP, CP,
DP) or the DeepSpeed ZeRO-3 engine. Writes OUT/metrics.jsonl (+ TensorBoard), OUT/checkpoints/step_N/,
OUT/flops.json and OUT/summary.json; with run.validate_every, `val/*` rows in metrics.jsonl
(megatron_wan.validation); with run.sample_every, videos under OUT/samples/step_N/ (megatron_wan.train_samples).
SIGTERM / SIGUSR1 (SLURM pre-emption) make every rank save and exit; a re-launch with the same output_dir resumes
exactly where it stopped.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_wan import checkpointing, parallel, preemption, torch_version_problem, train_samples
from megatron_wan.compile import compile_blocks, compile_stats, watch_recompiles
from megatron_wan.config import (
    Config,
    ConfigError,
    accumulation_steps,
    check_cp_comm,
    load_config,
    resume_changes,
    validate,
)
from megatron_wan.data.datasets import PairDataset
from megatron_wan.data.loader import PairLoader, micro_batches, to_pair_batch
from megatron_wan.data.samplers import BucketBatchSampler
from megatron_wan.data.shards import CorruptSample
from megatron_wan.engines import build_engine
from megatron_wan.models import spec_for_preset
from megatron_wan.models.wan21.lora import apply_lora
from megatron_wan.objectives.experts import build_expert_model, flow_for
from megatron_wan.objectives.flow_matching import FlowMatching
from megatron_wan.objectives.pair_step import PairBatch, PairObjective
from megatron_wan.objectives.reference import make_reference
from megatron_wan.run_log import CollapseWatchdog, RunLog
from megatron_wan.throughput import peak_flops, step_flops
from megatron_wan.validation import Validator, val_pairs_path


def build_model(cfg: Config):
    """The policy, of the family of `model.preset`: from `model.weights` (diffusers or original layout) or randomly
    initialized from the preset."""
    m = cfg.model
    spec = spec_for_preset(m.preset)
    runtime = dict(attention_backend=m.attention_backend, layer_provider=m.layer_provider, cp_comm=m.cp_comm,
                   recompute=m.recompute)
    if m.weights:
        model = spec.load(m.weights, m.layout, **runtime)
    else:
        torch.manual_seed(m.init_seed)  # every rank builds the same weights
        model = spec.build(m.preset, **runtime)
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
        validate(cfg, _world_size())  # before the process groups: a layout error is a ConfigError, not a traceback
        self.dataset = PairDataset(cfg.data.dir, cfg.data.pairs, cfg.data.text_len, cfg.data.on_corrupt)
        check_cp_comm(cfg, self.dataset.shapes)  # before the model: CP must take these videos
        self.val_path = val_pairs_path(cfg)
        parallel.initialize(run.tensor_parallel, run.context_parallel, seed=run.seed)
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")
        self.out = Path(run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.autocast = run.dtype == "bf16"
        if torch.cuda.is_available():  # the peak below (and MFU) follows this setting
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = run.tf32
        self.ckpt_root = self.out / "checkpoints"
        resume_from = checkpointing.latest(self.ckpt_root, report=self._report) if run.resume else None
        if resume_from:
            self._check_resume(resume_from)

        model = (build_expert_model(cfg) if cfg.model.expert else build_model(cfg)).to(self.device)
        if run.finetune == "lora":
            torch.manual_seed(run.seed)  # the same adapters on every rank and in every parallel layout
            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
            if self.autocast:  # frozen base weights in bf16, trainable adapters in fp32
                for p in model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        self.reference = make_reference(cfg.objective.reference, model) if cfg.objective.mode != "sft" else None
        frozen_copy = self.reference.model if cfg.objective.reference == "copy" and self.reference else None
        if cfg.model.compile:  # after LoRA (and the reference copy), before FSDP2 shards the blocks
            watch_recompiles(echo=lambda line: self._report(f"recompile: {line}"))
            ref = self.reference.model if self.reference else model  # adapter: the policy itself
            for m in (model,) if ref is model else (model, ref):
                compile_blocks(m, cfg.model.compile_mode)
        self.engine = build_engine(cfg, model, frozen_copy)
        self.wan = model.wan
        self.description = spec_for_preset(cfg.model.preset).parameters(self.wan)  # step FLOPs derive from it

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
        self.objective = PairObjective(flow_for(cfg, FlowMatching(o.shift, o.timestep_sampling, seed=run.seed)),
                                       o.mode, o.beta, o.sft_weight, o.pair_mode)
        self.loader = PairLoader(self.dataset, self.sampler, num_workers=cfg.data.num_workers,
                                 prefetch=cfg.data.prefetch, pin_memory=self.device.type == "cuda")
        self.step, self.skipped, self.bad_in_row = 0, 0, 0
        self.save_seconds = 0.0  # the last save's duration (a resumed run: the checkpoint's)
        self.corrupt_skipped = 0  # pairs this rank skipped for a failed CRC32 (data.on_corrupt=skip)
        self.watchdog = CollapseWatchdog(run.collapse_gap, run.collapse_steps)
        if resume_from:
            trainer_state, rank_state = checkpointing.load(resume_from, self.engine)
            self.step, self.skipped = trainer_state["step"], trainer_state["skipped"]
            self.save_seconds = trainer_state.get("save_seconds", 0.0)
            self.loader.load_state_dict(trainer_state["sampler"])  # global: resumes on any data-parallel size
            if rank_state:  # None when resumed on another world size (no RNG stream is used by a step)
                checkpointing.set_rng_state(rank_state["rng"])
        self.resumed_from = str(resume_from) if resume_from else None
        self.peak, self.peak_source = peak_flops(torch.bfloat16 if self.autocast else torch.float32)
        self.log = None
        if self.rank == 0:
            self.log = RunLog(self.out, resume_step=self.step, tensorboard=run.tensorboard,
                              wandb_project=run.wandb_project, config=cfg.to_dict())
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.validator, self.step_sampler = self._watchers()
        self.watch_seconds = {"validation": 0.0, "sampling": 0.0}

    def _watchers(self):
        """The Validator (run.validate_every) and StepSampler (run.sample_every) of this run, or None."""
        cfg, run = self.cfg, self.cfg.run
        val = PairDataset(cfg.data.dir, self.val_path, cfg.data.text_len) if self.val_path else None
        validator = None
        if run.validate_every:
            validator = Validator(val, run.validate_pairs, self.objective, self.device, autocast=self.autocast,
                                  group=ps.get_data_parallel_group())
        sampler = None
        if run.sample_every:
            encoder_dir = self.dataset.manifest.get("model")
            if not encoder_dir or not Path(encoder_dir).is_dir():
                raise ConfigError(f"run.sample_every: {self.dataset.directory / 'manifest.json'} names no encoder "
                                  f"folder to decode samples with (model: {encoder_dir!r})")
            if self.rank == 0:
                train_samples.prepare_conditions(cfg, val, self.dataset.shapes[0], encoder_dir,
                                                 self.out / "samples" / "conditions.pt")
            dist.barrier()
            sampler = train_samples.StepSampler(cfg, encoder_dir, self.out, self.device, autocast=self.autocast)
        return validator, sampler

    def _report(self, message: str) -> None:
        if self.rank == 0:
            print(f"train: {message}", file=sys.stderr, flush=True)

    def _check_resume(self, path: Path) -> None:
        """Refuse to resume `path` under settings that change the math; report the ones that may change."""
        saved = json.loads((path / "trainer.json").read_text())["config"]
        refused, allowed = resume_changes(saved, self.cfg)
        if refused:
            raise ConfigError(f"resume from {path}: {'; '.join(refused)} (these change the run's math: set them "
                              f"back, or start a new run with another run.output_dir or run.resume=false)")
        if allowed:
            self._report(f"resume from {path} with changed settings: {'; '.join(allowed)}")

    # -- one step ----------------------------------------------------------------------------------

    def _micro_batches(self) -> list[PairBatch]:
        """This rank's share of the step's global batch, as `accumulation` micro-batches of run.batch_size."""
        batch = next(self.loader)
        self.corrupt_skipped += batch["corrupt_skipped"]
        return [to_pair_batch(micro, self.device, self.cfg.objective.mode != "sft",
                              non_blocking=self.device.type == "cuda")
                for micro in micro_batches(batch, self.cfg.run.batch_size)]

    def _mean_over_dp(self, metrics: dict) -> dict:
        """Means over the data-parallel ranks; `*_min` / `*_max` metrics: their minimum / maximum."""
        out = {}
        for op, names in ((dist.ReduceOp.SUM, [n for n in sorted(metrics) if not n.endswith(("_min", "_max"))]),
                          (dist.ReduceOp.MIN, [n for n in sorted(metrics) if n.endswith("_min")]),
                          (dist.ReduceOp.MAX, [n for n in sorted(metrics) if n.endswith("_max")])):
            values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
            if names:
                dist.all_reduce(values, op=op, group=ps.get_data_parallel_group())
            scale = self.dp_size if op == dist.ReduceOp.SUM else 1
            out.update({n: v / scale for n, v in zip(names, values.tolist())})
        return out

    def _flops(self, grid, pairs: int) -> dict:
        """FLOPs of one step of this data-parallel rank (`pairs` pairs of latent `grid`), by part."""
        lora = self.cfg.lora if self.cfg.run.finetune == "lora" else None
        parts = step_flops(self.description, tuple(grid), self.cfg.data.text_len, pairs, self.cfg.objective.mode,
                           self.cfg.objective.pair_mode, lora.rank if lora else 0, self.wan.recompute,
                           lora.targets if lora else None)
        return {k: v / self.pair_split for k, v in parts.items()}

    def _backward(self, loss):
        self.engine.backward(loss / self.accumulation)  # the optimizer step's loss: the mean over micro-batches

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        size = self.cfg.run.batch_size
        self.engine.begin_step(self.accumulation * self.objective.backward_passes(size))
        outs, micro = [], self._micro_batches()
        for batch in micro:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                outs.append(self.objective.step(self.engine.model, self.reference, batch, self.step,
                                                backward=self._backward).metrics)
        lr = learning_rate(self.step, self.cfg)
        grad_norm, stepped = self.engine.step(lr)
        local = {k: min(m[k] for m in outs) if k.endswith("_min") else max(m[k] for m in outs) if k.endswith("_max")
                 else sum(m[k] for m in outs) / len(outs) for k in outs[0]}
        stepped = stepped and math.isfinite(local["loss"])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            if self.cfg.run.empty_cache:
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        metrics = self._mean_over_dp(local)
        step_pairs = sum(len(b.sample_ids) for b in micro)
        flops = self._flops(batch.win.shape[2:], step_pairs)["total"]
        pairs = step_pairs * self.dp_size // self.pair_split
        videos = pairs * (1 if self.cfg.objective.mode == "sft" else 2)
        per_device = flops / (self.cfg.run.tensor_parallel * self.cfg.run.context_parallel) / seconds
        metrics.update(lr=lr, grad_norm=grad_norm, step_time=seconds, samples_per_s=pairs / seconds,
                       tokens_per_s=videos * self.description.video_tokens(batch.win.shape[2:]) / seconds,
                       tflops=flops * self.dp_size / seconds / 1e12, mfu=per_device / self.peak,
                       peak_memory_gb=_peak_memory_gb(), skipped=int(not stepped))
        if self.cfg.model.compile:
            stats = compile_stats()  # of this process, so a sum over the compiled models it holds
            metrics.update(compile_graphs=stats["graphs"], recompiles=stats["recompiles"],
                           compile_seconds=stats["seconds"])
        return metrics

    # -- the run -----------------------------------------------------------------------------------

    def _agreed_stop(self) -> bool:
        flag = torch.tensor([1.0 if preemption.requested() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self) -> None:
        started = time.perf_counter()
        state = {"step": self.step, "skipped": self.skipped, "config": self.cfg.to_dict(),
                 "save_seconds": self.save_seconds, "world_size": dist.get_world_size(),
                 "sampler": self.loader.state_dict()}  # global batches: resumes on any data-parallel size
        rank_state = {"rng": checkpointing.rng_state()}
        checkpointing.save(self.ckpt_root, self.step, self.engine, state, rank_state, self.cfg.run.keep_last)
        self.save_seconds = time.perf_counter() - started

    def _check_save_window(self, step_seconds: float) -> None:
        """Warn (rank 0) when the SLURM stop signal's lead time cannot hold a step and a save."""
        warning = preemption.save_window_warning(preemption.signal_lead(), step_seconds, self.save_seconds)
        if warning and self.rank == 0:
            print(f"train: warning: {warning}", file=sys.stderr, flush=True)

    def _watch(self, final: bool) -> None:
        """Validation and samples when due, their seconds logged (and outside the step-time metrics); the RNG
        states are left as they were, so that training continues as it would without them."""
        run = self.cfg.run
        rng = checkpointing.rng_state()
        if self.validator and (self.step % run.validate_every == 0 or final):
            t0 = time.perf_counter()
            metrics = self.validator(self.engine.model, self.reference)
            metrics["val/seconds"] = time.perf_counter() - t0
            self.watch_seconds["validation"] += metrics["val/seconds"]
            if self.log:
                self.log.log(self.step, metrics)
        if self.step_sampler and self.step % run.sample_every == 0:
            t0 = time.perf_counter()
            self.step_sampler(self.engine.module, self.step, self.log)
            seconds = time.perf_counter() - t0
            self.watch_seconds["sampling"] += seconds
            if self.log:
                self.log.log(self.step, {"samples/seconds": seconds})
        checkpointing.set_rng_state(rng)

    def _write_flops(self) -> None:
        grid = self.dataset.shapes[0][1:]
        parts = self._flops(grid, self.cfg.run.batch_size * self.accumulation)
        (self.out / "flops.json").write_text(json.dumps({
            "per_data_parallel_rank_step": parts, "latent_grid": list(grid), "text_len": self.cfg.data.text_len,
            "peak_flops_per_device": self.peak, "peak_source": self.peak_source, "tf32": self.cfg.run.tf32},
            indent=1))
        print(f"FLOPs per step and data-parallel rank at latent grid {list(grid)}: {parts['total']:.4g} "
              f"({', '.join(f'{k} {v:.3g}' for k, v in parts.items() if k != 'total')}); "
              f"peak {self.peak:.3g} FLOP/s ({self.peak_source})")

    def run(self) -> dict:
        """Train to `run.steps` (or until a stop signal); returns the summary."""
        run = self.cfg.run
        previous = preemption.install()
        if self.rank == 0:
            self._write_flops()
        bar = tqdm(total=run.steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0,
                   file=sys.stderr)
        last, started, first_step = {}, time.perf_counter(), self.step
        try:
            while self.step < run.steps:
                if self.step == first_step and self._agreed_stop():
                    break  # stopped while starting: nothing new to save
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
                self._watch(final=self.step == run.steps)
                stop = self._agreed_stop()
                saves = stop or self.step % run.save_every == 0 or self.step == run.steps
                if saves:
                    self.save()
                if self.step == first_step + 1 or saves:  # with the last save's time (from the checkpoint at first)
                    self._check_save_window(metrics["step_time"])
                if stop:
                    break
        finally:
            bar.close()
            preemption.restore(previous)
        corrupt = torch.tensor([self.corrupt_skipped], device=self.device)
        dist.all_reduce(corrupt)
        summary = {"steps": self.step, "steps_this_launch": self.step - first_step, "skipped": self.skipped,
                   "corrupt_pairs_skipped": int(corrupt.item()),
                   "collapse_warnings": self.watchdog.warned, "interrupted": self.step < run.steps,
                   "resumed_from": self.resumed_from, "seconds": time.perf_counter() - started,
                   "watch_seconds": self.watch_seconds,
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


def _world_size() -> int:
    """The world size this process will join (torchrun's WORLD_SIZE; 1 for a plain process)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    problem = torch_version_problem(torch.__version__)
    if problem:
        sys.exit(f"megatron_wan.train: {problem}")
    preemption.install()  # a stop signal while the model loads is a request to stop, not the end of the process
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
    except ConfigError as e:  # the same on every rank: one line, from rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron_wan.train: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FileNotFoundError as e:
        sys.exit(f"megatron_wan.train: {e}")
    try:
        return trainer.run()
    except CorruptSample as e:  # data.on_corrupt=abort: the shard and sample, not a traceback
        sys.exit(f"megatron_wan.train: rank {trainer.rank}: {e}")


if __name__ == "__main__":
    main()
