"""The acceptance check for the first GPU machine: every CUDA-only path, run and measured in one go.

    python -m megatron_wan.bench gpu_check [--out DIR] [--list]        (also: make gpu-check)

Without a CUDA device it prints one line saying there is nothing to check and exits 0. On a GPU it runs each
step below on its own (a failing step prints its name and error, and the rest go on), prints one table and writes
DIR/gpu_check.json; the exit code is the number of failed steps. `--list` prints the steps. Sized for one
H100/H200 in under 8 minutes; the CP, TP and NCCL steps need >= 2 GPUs (NCCL uses all of them).

Tolerances are measured, not guessed: `baseline` runs diffusers' WanTransformer3DModel under bf16 autocast against
itself in fp32 on the same weights and inputs; every bf16 comparison of ours must stay within FACTOR times that
baseline's error (output, input gradient, worst parameter gradient).
"""

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

FACTOR = 2.0  # ours may differ from fp32 diffusers by at most this times bf16 diffusers' own error
MATMUL = 8192  # side of the bf16 matmul timed against the table peak
NEEDS_BASELINE = ("parity", "compile", "cp2", "tp2")  # steps whose limits come from ctx["baseline"]
NO_CUDA = "gpu_check: no CUDA device here, nothing to check (run it on a GPU machine: make gpu-check)"


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    gpus: int = 1  # GPUs it needs
    package: str | None = None  # a Python module it needs (transformer_engine, flash_attn)


def _parity_steps():
    packages = {"local": None, "sdpa": None, "te": "transformer_engine", "flash": "flash_attn"}
    for provider in ("local", "te"):
        for backend in ("sdpa", "flash", "te"):
            need = "+".join(sorted({packages[provider], packages[backend]} - {None})) or None
            yield Step(f"parity:{provider}+{backend}", f"layer_provider={provider}, attention_backend={backend}, bf16: "
                       f"forward + backward against fp32 diffusers, T2V and I2V, uneven frames", 1, need)


STEPS = (
    Step("environment", "torch, CUDA, GPUs, NCCL, Transformer Engine and flash-attn versions"),
    Step("baseline", "diffusers bf16 autocast vs diffusers fp32: the errors every tolerance is set from"),
    *_parity_steps(),
    Step("parity:per-token", "Wan 2.2 TI2V per-token timesteps (first frame at t=0), bf16, against fp32 diffusers; "
         "tolerance from diffusers' own bf16 error on the same timesteps"),
    Step("compile", "model.compile (regional torch.compile, Inductor on CUDA), bf16: forward + backward against the "
         "eager model; no recompile on a second call"),
    Step("cp2:ring", "CP=2 ring vs CP=1 (sdpa), padded (5 token frames) and unpadded (4) videos", 2),
    Step("cp2:ulysses", "CP=2 Ulysses vs CP=1 (sdpa), padded and unpadded", 2),
    Step("cp2:ulysses+te", "CP=2 Ulysses with TE's kernel (built for heads / CP) vs CP=1", 2, "transformer_engine"),
    Step("cp2:te", "CP=2 TE's p2p CP vs CP=1 unpadded; padded refused by name, auto falls back to ring", 2,
         "transformer_engine"),
    Step("tp2:local", "TP=2 vs TP=1, megatron-core linears", 2),
    Step("tp2:te", "TP=2 vs TP=1, Transformer Engine linears", 2, "transformer_engine"),
    Step("nccl", "all-reduce over every GPU: the sum and the bus bandwidth", 2),
    Step("train:megatron", "5 bf16 Reg-DPO LoRA steps of the tiny recipe on CUDA, Megatron engine: losses finite"),
    Step("train:deepspeed", "the same with DeepSpeed ZeRO-3 + offload; step-1 loss equal to the Megatron engine's"),
    Step("sampler", "WanSampler on CUDA (bf16) against diffusers' WanPipeline on the same tiny folder"),
    Step("throughput", "MFU of a bf16 matmul and of a Reg-DPO step (1.3B preset, 2 layers, 480p 81 frames); "
         "peak memory against the planner's prediction"),
)


def within(error: float, baseline: float, factor: float = FACTOR) -> bool:
    """Whether a bf16 error is acceptable: finite and at most `factor` times the bf16 baseline's."""
    return math.isfinite(error) and error <= factor * baseline


def skip_reason(step: Step, gpus: int, present, baseline: bool = True) -> str | None:
    """Why `step` does not run on a machine with `gpus` GPUs and the modules `present`, `baseline` telling whether
    the baseline step's errors are there (None: it runs)."""
    if step.gpus > gpus:
        return f"needs {step.gpus} GPUs, {gpus} present"
    missing = [m for m in (step.package or "").split("+") if m and m not in present]
    if missing:
        return f"{' and '.join(missing)} not installed"
    if not baseline and step.name.startswith(NEEDS_BASELINE):
        return "needs the baseline step's errors (it failed or was not run)"
    return None


def list_steps() -> str:
    return "\n".join(f"{s.name:<22} {s.what}" + (f" [{s.gpus} GPUs]" if s.gpus > 1 else "") for s in STEPS)


# -- shared pieces ------------------------------------------------------------------------------------------------

def check_config(task: str):
    """A small Wan with the real head dim (128): 4 heads, 2 layers."""
    from megatron_wan.models.wan21 import WanConfig

    extra = dict(model_type="i2v", in_dim=36, image_dim=128) if task == "i2v" else {}
    return WanConfig(dim=512, ffn_dim=1024, num_heads=4, num_layers=2, text_dim=256, **extra)


def _row(check, value, limit=None, ok=True, note=""):
    return {"check": check, "value": value, "limit": limit, "ok": bool(ok), "note": note}


def _grads(model):
    return {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, batch, diffusers: bool, bf16: bool):
    """(output, input gradient, parameter gradients) of a fixed weighted sum, on CUDA, optionally under bf16
    autocast (as training runs: fp32 weights)."""
    x, t, text, clip = (None if v is None else v.cuda() for v in batch)
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        out = model(x, t, text, clip, return_dict=False)[0] if diffusers else model(x, t, text, clip)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).cuda()
    (out.float() * weight).sum().backward()
    return out.detach().float().cpu(), x.grad.float().cpu(), _grads(model)


def _errors(got, want, rename=None):
    from megatron_wan.bench.parity import rel_err

    (out, dx, grads), (out_w, dx_w, grads_w) = got, want
    worst = max(((rel_err(g, grads_w[rename(n) if rename else n]), n) for n, g in grads.items()))
    return {"output": rel_err(out, out_w), "input_grad": rel_err(dx, dx_w), "param_grad": worst[0]}, worst[1]


GRIDS = {"t2v": (5, 4, 6), "i2v": (3, 4, 6)}  # token grids with frame counts CP=2 does not split evenly


def _reference(task):
    from megatron_wan.bench.parity import inputs, perturbed_reference

    cfg = check_config(task)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return cfg, perturbed_reference(cfg).cuda(), inputs(cfg, GRIDS[task], timesteps=(20.0, 800.0))


# -- the steps ----------------------------------------------------------------------------------------------------

def step_environment(ctx):
    import importlib

    rows = [_row("torch", torch.__version__), _row("cuda", torch.version.cuda),
            _row("gpus", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))),
            _row("nccl", ".".join(map(str, torch.cuda.nccl.version()))),
            _row("bf16 supported", torch.cuda.is_bf16_supported(), ok=torch.cuda.is_bf16_supported())]
    for module in ("transformer_engine", "flash_attn", "megatron.core", "deepspeed", "diffusers"):
        try:
            rows.append(_row(module, getattr(importlib.import_module(module), "__version__", "present")))
        except ImportError:
            rows.append(_row(module, "not installed"))
    return rows


def step_baseline(ctx):
    rows = []
    for task in ("t2v", "i2v"):
        _, ref, batch = _reference(task)
        errors, worst = _errors(forward_backward(ref, batch, True, True), forward_backward(ref, batch, True, False))
        ctx.setdefault("baseline", {})[task] = errors
        rows += [_row(f"{task} {k}", v, note=f"worst: {worst}" if k == "param_grad" else "") for k, v in errors.items()]
    return rows


def step_parity(provider, backend):
    def run(ctx):
        from megatron_wan import parallel
        from megatron_wan.models.wan21 import WanModel
        from megatron_wan.models.wan21.adapter import rename

        parallel.initialize()
        rows = []
        for task in ("t2v", "i2v"):
            _, ref, batch = _reference(task)
            want = forward_backward(ref, batch, True, False)
            ours = WanModel.from_diffusers(ref, attention_backend=backend, layer_provider=provider).cuda()
            errors, worst = _errors(forward_backward(ours, batch, False, True), want,
                                    lambda n: rename(n, "diffusers"))
            base = ctx["baseline"][task]
            rows += [_row(f"{task} {k}", v, FACTOR * base[k], within(v, base[k]),
                          f"worst: {worst}" if k == "param_grad" else "") for k, v in errors.items()]
        return rows
    return run


def step_per_token(ctx):
    from megatron_wan import parallel
    from megatron_wan.bench.parity import inputs, perturbed_reference
    from megatron_wan.models.wan21 import WanModel
    from megatron_wan.models.wan21.adapter import rename

    parallel.initialize()
    cfg = check_config("t2v").replace(expand_timesteps=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = perturbed_reference(cfg).cuda()
    x, _, text, clip = inputs(cfg, GRIDS["t2v"])
    tokens = x.shape[2] * x.shape[3] * x.shape[4] // math.prod(cfg.patch_size)
    t = torch.rand(x.shape[0], tokens, generator=torch.Generator().manual_seed(5)) * 1000
    t[:, : tokens // x.shape[2]] = 0  # the first latent frame's tokens: the conditioning image (TI2V)
    batch = (x, t, text, clip)
    want = forward_backward(ref, batch, True, False)
    base, _ = _errors(forward_backward(ref, batch, True, True), want)
    ours = WanModel.from_diffusers(ref).cuda()
    errors, worst = _errors(forward_backward(ours, batch, False, True), want, lambda n: rename(n, "diffusers"))
    return [_row(k, v, FACTOR * base[k], within(v, base[k]), f"worst: {worst}" if k == "param_grad" else "")
            for k, v in errors.items()]


def step_compile(ctx):
    from megatron_wan import parallel
    from megatron_wan.compile import compile_blocks, compile_stats
    from megatron_wan.models.wan21 import WanModel

    parallel.initialize()
    rows = []
    for task in ("t2v", "i2v"):
        _, ref, batch = _reference(task)
        eager = forward_backward(WanModel.from_diffusers(ref).cuda(), batch, False, True)
        model = compile_blocks(WanModel.from_diffusers(ref).cuda(), "default")
        forward_backward(model, batch, False, True)  # the first call compiles
        graphs = compile_stats()["graphs"]
        errors, worst = _errors(forward_backward(model, batch, False, True), eager)
        base = ctx["baseline"][task]
        rows += [_row(f"{task} {k} vs eager", v, FACTOR * base[k], within(v, base[k]),
                      f"worst: {worst}" if k == "param_grad" else "") for k, v in errors.items()]
        stats = compile_stats()
        rows.append(_row(f"{task} graphs after a second call", stats["graphs"], graphs, stats["graphs"] == graphs,
                         f"{stats['recompiles']} recompiles, {stats['seconds']:.1f} s compiling"))
    return rows


def input_grad(per_rank: list) -> tuple[torch.Tensor, float]:
    """(the input gradient, the largest relative difference of any rank's from it) of a TP x CP run of the public
    forward: every rank holds the whole input gradient (CP's scatter all-gathers it, TP's copy all-reduces it), so
    rank 0's is the gradient and the others must agree with it."""
    from megatron_wan.bench.parity import rel_err

    first = per_rank[0]
    return first, max((rel_err(g, first) for g in per_rank[1:]), default=0.0)


def _parallel_worker(tp, cp, cp_comm, backend, provider, task, frames, state, verified_cp=()):
    """One rank of a TP x CP run (NCCL): output, input gradient and gradients, on the CPU, and the CP exchange the
    model was built for. `verified_cp` stands for VERIFIED_ON_GPU's cp_comm in this process (what `auto` may
    build)."""
    from megatron_wan import parallel
    from megatron_wan.bench.parity import inputs
    from megatron_wan.models.wan21 import WanModel
    from megatron_wan.models.wan21.attention import VERIFIED_ON_GPU

    VERIFIED_ON_GPU["cp_comm"] = tuple(verified_cp)
    parallel.initialize(tp, cp)
    cfg = check_config(task)
    model = WanModel.from_diffusers(state, num_heads=cfg.num_heads, attention_backend=backend,
                                    layer_provider=provider, cp_comm=cp_comm).cuda()
    grid = (frames, *GRIDS[task][1:])
    out, dx, grads = forward_backward(model, inputs(cfg, grid, timesteps=(20.0, 800.0)), False, True)
    built = sorted({m.cp_comm for m in model.modules() if getattr(m, "cp_comm", None)})
    return out, dx, grads, ",".join(built)


def _compare_parallel(tp, cp, cp_comm, backend="sdpa", provider="local", frames=(5, 4), verified_cp=(),
                      expect_built=None):
    """A TP x CP run against one process, per frame count; `expect_built`: the cp_comm the model must be built for
    (checked when given)."""
    def run(ctx):
        from megatron_wan.bench.parity import rel_err
        from megatron_wan.models.wan21.adapter import merge_tp
        from megatron_wan.parallel.local import run_local

        rows = []
        for task in ("t2v",):
            cfg, ref, _ = _reference(task)
            state = {k: v.cpu() for k, v in ref.state_dict().items()}
            for f in frames:
                args = (cp_comm, backend, provider, task, f, state, verified_cp)
                one = run_local(_parallel_worker, 1, 1, 1, *args)[0]
                ranks = run_local(_parallel_worker, tp * cp, tp, cp, *args)
                out = ranks[0][0]
                dx, spread = input_grad([r[1] for r in ranks])
                if tp > 1:
                    grads = merge_tp([r[2] for r in ranks], cfg)
                else:
                    grads = {n: sum(r[2][n] for r in ranks) for n in ranks[0][2]}
                worst = max(rel_err(g, one[2][n]) for n, g in grads.items())
                base = ctx["baseline"][task]
                label = f"{f} token frames" + (" (padded)" if f % cp else "")
                for name, v, b in (("output", rel_err(out, one[0]), base["output"]),
                                   ("input_grad", rel_err(dx, one[1]), base["input_grad"]),
                                   ("param_grad", worst, base["param_grad"])):
                    rows.append(_row(f"{label} {name}", v, FACTOR * b, within(v, b)))
                rows.append(_row(f"{label} input_grad ranks agree", spread, FACTOR * base["input_grad"],
                                 within(spread, base["input_grad"]), "largest difference from rank 0's"))
                if cp > 1:
                    built = ranks[0][3]
                    rows.append(_row(f"{label} built for", built, expect_built, expect_built in (None, built)))
        return rows
    return run


CP_TE_CASES = (  # (row, cp_comm, token frames, VERIFIED_ON_GPU["cp_comm"] in the workers, the build expected)
    ("te", "te", 4, (), "te"),
    ("te refuses", "te", 5, (), "te"),
    # auto is built for TE's CP only once te is verified; then each call on a video TE cannot take runs ring
    ("auto->ring", "auto", 5, ("te",), "te"),
)


def step_cp_te(ctx):
    """TE's CP on an unpadded video; on a padded one, explicit te must refuse by name and auto (built for TE's CP)
    must run ring for that call."""
    rows = []
    for label, cp_comm, frames, verified, built in CP_TE_CASES:
        compare = _compare_parallel(1, 2, cp_comm, backend="te", frames=(frames,), verified_cp=verified,
                                    expect_built=built)
        if label != "te refuses":
            rows += [{**r, "check": f"{label}: {r['check']}"} for r in compare(ctx)]
            continue
        try:
            compare(ctx)
            rows.append(_row(f"{frames} token frames, cp_comm=te", "ran", ok=False,
                             note="expected a refusal naming the frames"))
        except RuntimeError as e:  # the workers' error, re-raised by run_local
            refused = "token frames do not split evenly" in str(e)
            rows.append(_row(f"{frames} token frames, cp_comm=te", "refused" if refused else "failed", ok=refused))
    return rows


def _nccl_worker():
    import torch.distributed as dist

    from megatron_wan import parallel

    parallel.initialize()
    n = dist.get_world_size()
    x = torch.full((64 * 2**20,), float(dist.get_rank() + 1), device="cuda")  # 256 MiB
    dist.all_reduce(x)
    ok = bool((x == n * (n + 1) / 2).all())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 5
    return ok, x.numel() * 4 * 2 * (n - 1) / n / seconds / 1e9  # bus bandwidth, GB/s


def step_nccl(ctx):
    from megatron_wan.parallel.local import run_local

    results = run_local(_nccl_worker, torch.cuda.device_count())
    return [_row("all-reduce sum", all(ok for ok, _ in results), ok=all(ok for ok, _ in results)),
            _row("bus bandwidth GB/s", min(bw for _, bw in results), note=f"{len(results)} GPUs, 256 MiB")]


def write_pairs(directory: Path, cfg, pairs: int = 2, latent=(16, 3, 8, 12), text_len: int = 16) -> Path:
    """A random encoded dataset in the shard format PairDataset reads (T2V): `pairs` pairs of `latent`."""
    from megatron_wan.data.shards import ShardWriter

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    with ShardWriter(directory / "shard-00000", {"encoder": {"task": "t2v"}}) as writer:
        for i in range(2 * pairs):
            writer.add(f"v{i}", {"latent": torch.randn(latent, generator=g),
                                 "text_emb": torch.randn(text_len, cfg.text_dim, generator=g)})
    lines = [json.dumps({"id": f"p{i}", "winner": {"id": f"v{2 * i}"}, "loser": {"id": f"v{2 * i + 1}"}})
             for i in range(pairs)]
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "manifest.json").write_text(json.dumps({"encoder": {"task": "t2v"},
                                                         "shards": [{"prefix": "shard-00000"}]}))
    return directory


def _train_worker(argv):
    from megatron_wan.train import main

    main(argv)


def step_train(engine):
    def run(ctx):
        from megatron_wan.models.wan21 import preset
        from megatron_wan.parallel.local import run_local

        root = Path(ctx["out"]) / "train"
        data = write_pairs(root / "data", preset("tiny"))
        out = root / engine
        recipe = Path(__file__).resolve().parents[2] / "configs" / "tiny-t2v-regdpo.yaml"
        argv = ["--config", str(recipe), "model.weights=null", "model.preset=tiny", f"data.dir={data}",
                f"run.output_dir={out}", "run.steps=5", "run.save_every=5", "run.context_parallel=1",
                "run.dtype=bf16", f"run.engine={engine}", "run.tensorboard=false", "run.resume=false"]
        run_local(_train_worker, 1, argv)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        ctx.setdefault("losses", {})[engine] = losses
        rows = [_row("steps", len(losses), 5, len(losses) == 5),
                _row("losses finite", all(map(math.isfinite, losses)), ok=all(map(math.isfinite, losses)),
                     note=" ".join(f"{v:.4g}" for v in losses))]
        if engine == "deepspeed" and "megatron" in ctx.get("losses", {}):
            first = ctx["losses"]["megatron"][0]
            diff = abs(losses[0] - first) / abs(first)
            rows.append(_row("step-1 loss vs megatron (rel)", diff, 1e-2, diff <= 1e-2))
        return rows
    return run


def step_sampler(ctx):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from megatron_wan import parallel
    from megatron_wan.bench.parity import rel_err
    from megatron_wan.models.wan21.tiny import write_tiny_wan
    from megatron_wan.sampling import SamplingConfig, WanSampler

    parallel.initialize()
    folder = write_tiny_wan(Path(ctx["out"]) / "tiny-wan-t2v", "t2v")
    prompt, negative, seeds = "a white rabbit walks in a green meadow", "dark", (3, 11)
    steps, shift, scale = 4, 3.0, 5.0
    pipe = WanPipeline.from_pretrained(folder).to("cuda")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.set_progress_bar_config(disable=True)

    def pipeline_latents(dtype):
        pipe.transformer.to(dtype)
        last = {}

        def keep(pipe, i, t, tensors):
            last.update(tensors)
            return tensors

        pipe(prompt=[prompt] * 2, negative_prompt=[negative] * 2, num_frames=9, height=32, width=48,
             num_inference_steps=steps, guidance_scale=scale, output_type="latent",
             generator=[torch.Generator().manual_seed(s) for s in seeds], callback_on_step_end=keep)
        return last["latents"].float().cpu()

    exact, half = pipeline_latents(torch.float32), pipeline_latents(torch.bfloat16)
    baseline = rel_err(half, exact)
    sampler = WanSampler(folder, dtype=torch.bfloat16)
    device = next(sampler.model.parameters()).device
    ours = sampler.sample(sampler.conditions(prompt, 9), sampler.latent_shape(9, 32, 48), seeds,
                          SamplingConfig("euler", steps, shift, scale, negative)).float().cpu()
    err = rel_err(ours, exact)
    return [_row("device", str(device), ok=device.type == "cuda"),
            _row("baseline: WanPipeline bf16 vs fp32", baseline),
            _row("ours bf16 vs WanPipeline fp32", err, FACTOR * baseline, within(err, baseline))]


def planned_memory(**setup) -> int:
    """The planner's per-GPU bytes for `setup` (bench.plan.Setup fields) with its preset cut to 2 layers."""
    from megatron_wan.bench.plan import Setup, memory
    from megatron_wan.models.wan21 import preset

    class TwoLayers(Setup):
        def config(self):
            return preset(self.preset, num_layers=2)

    return memory(TwoLayers(**setup))["total"]


def step_throughput(ctx):
    from megatron_wan import parallel
    from megatron_wan.bench.mfu import _regdpo_step
    from megatron_wan.models.wan21 import SPEC, WanModel, preset
    from megatron_wan.throughput import peak_flops, step_flops, time_it

    parallel.initialize()
    peak, source = peak_flops(torch.bfloat16)
    matrix = torch.randn(MATMUL, MATMUL, device="cuda", dtype=torch.bfloat16)
    matmul_s = time_it(lambda: matrix @ matrix, repeats=10)
    rows = [_row("bf16 matmul MFU", 2 * MATMUL**3 / matmul_s / peak, note=f"{MATMUL}^3; peak: {source}")]
    cfg = preset("wan2.1-t2v-1.3b", num_layers=2)
    grid, text_len = (21, 60, 104), 512  # 480p (832x480), 81 frames
    torch.manual_seed(0)
    model = WanModel(cfg).cuda()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *grid, generator=g).cuda()
    text = torch.randn(1, text_len, cfg.text_dim, generator=g).cuda()
    step = _regdpo_step(model, (x, None, text), "bf16")
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", torch.bfloat16):
        seconds = time_it(step, repeats=3)
    flops = step_flops(SPEC.parameters(cfg), grid, text_len, 1)["total"]
    measured = torch.cuda.max_memory_allocated()
    gpu = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    predicted = planned_memory(preset="wan2.1-t2v-1.3b", height=480, width=832, frames=81, gpus=1, cp=1,
                               finetune="full", reference="copy", recompute=False, pair_mode="batched", gpu=gpu,
                               reserve_gib=0.0)
    rows += [_row("Reg-DPO step s", seconds, note="1.3B preset, 2 layers, latent 21x60x104, batched pair, full FT"),
             _row("Reg-DPO step MFU", flops / seconds / peak, note=f"{flops:.3g} FLOPs"),
             _row("peak memory GiB", measured / 2**30),
             _row("peak memory / planner", measured / predicted, note=f"planner: {predicted / 2**30:.2f} GiB "
                  f"(no reserve)")]
    return rows


RUNNERS = {
    "environment": step_environment, "baseline": step_baseline,
    **{f"parity:{p}+{b}": step_parity(p, b) for p in ("local", "te") for b in ("sdpa", "flash", "te")},
    "parity:per-token": step_per_token, "compile": step_compile,
    "cp2:ring": _compare_parallel(1, 2, "ring"), "cp2:ulysses": _compare_parallel(1, 2, "ulysses"),
    "cp2:ulysses+te": _compare_parallel(1, 2, "ulysses", backend="te"), "cp2:te": step_cp_te,
    "tp2:local": _compare_parallel(2, 1, "ring", frames=(5,)),
    "tp2:te": _compare_parallel(2, 1, "ring", provider="te", frames=(5,)),
    "nccl": step_nccl, "train:megatron": step_train("megatron"), "train:deepspeed": step_train("deepspeed"),
    "sampler": step_sampler, "throughput": step_throughput,
}


def _present() -> set:
    import importlib.util

    return {m for m in ("transformer_engine", "flash_attn") if importlib.util.find_spec(m) is not None}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(results: list[dict]) -> str:
    lines = [f"{'step':<22} {'check':<34} {'value':>12} {'limit':>10}  result", "-" * 92]
    for r in results:
        if r["status"] != "ran":
            lines.append(f"{r['step']:<22} {'':<34} {'':>12} {'':>10}  {r['status'].upper()}: {r['reason']}")
            continue
        for row in r["rows"]:
            limit = "" if row["limit"] is None else _format(row["limit"])
            lines.append(f"{r['step']:<22} {row['check']:<34} {_format(row['value']):>12} {limit:>10}  "
                         f"{'ok' if row['ok'] else 'FAIL'} {row['note']}".rstrip())
    return "\n".join(lines)


def run_steps(out: Path, only=None) -> list[dict]:
    ctx, results = {"out": str(out)}, []
    gpus, present = torch.cuda.device_count(), _present()
    for step in STEPS:
        if only and step.name not in only:
            continue
        reason = skip_reason(step, gpus, present, "baseline" in ctx)
        if reason:
            results.append({"step": step.name, "status": "skip", "reason": reason, "rows": []})
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {step.name} ...", flush=True)
        try:
            rows = RUNNERS[step.name](ctx)
            failed = [r["check"] for r in rows if not r["ok"]]
            results.append({"step": step.name, "status": "ran", "ok": not failed, "rows": rows,
                            "seconds": time.perf_counter() - t0})
        except Exception as e:  # a failing step is reported and the rest go on
            print(f"gpu_check: {step.name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            traceback.print_exc()
            results.append({"step": step.name, "status": "error", "reason": f"{type(e).__name__}: {e}",
                            "rows": [], "seconds": time.perf_counter() - t0})
        torch.cuda.empty_cache()
    return results


def failures(results: list[dict]) -> int:
    """Steps that raised or had a check out of its limit (skipped steps do not count)."""
    return sum(r["status"] == "error" or (r["status"] == "ran" and not r["ok"]) for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_wan.bench gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/gpu_check")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    ap.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps (baseline is needed by most)")
    args = ap.parse_args(argv)
    if args.list:
        print(list_steps())
        return 0
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    os.environ.setdefault("NVTE_DEBUG", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_steps(out, args.only)
    n = failures(results)
    text = table(results)
    print(text)
    print(f"gpu_check: {n} failed step(s) in {time.perf_counter() - started:.0f} s -> {out / 'gpu_check.json'}")
    (out / "gpu_check.json").write_text(json.dumps({
        "device": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "factor": FACTOR,
        "failures": n, "steps": results}, indent=1, default=str))
    return n


if __name__ == "__main__":
    sys.exit(main())
