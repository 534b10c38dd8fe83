"""Context parallelism over video tokens: frame-axis shards and self-attention across the CP group.

Sharding (`FrameShard`): a video's token frames are split contiguously over the CP ranks, each rank
holding k = ceil(frames / cp) of them. When cp does not divide the frame count the tail of the video
is padded (21 latent frames over CP=4: 6, 6, 6 and 3 + 3 padding); padded tokens are never attended
to as keys and never enter the loss, so they change no result. Text and CLIP tokens stay whole on
every rank: cross-attention needs no CP communication.

Self-attention across ranks (`cp_comm`):
- `ring`: each rank's K/V travel once around the ring (point-to-point, overlapped with compute);
  partial outputs are merged by their log-sum-exp. Each chunk runs torch's flash kernel on CUDA where the flash
  rule of `kernel_for_call` allows (fp16/bf16, head dim a multiple of 8 up to 256), its memory-efficient one
  otherwise (`ring_kernel`). Its backward is its own: K/V go round again and
  their gradients travel with them back to their owner. Padded keys are cut off each chunk.
- `ulysses`: all-to-all from sequence-sharded, all heads to whole sequence, heads/cp; any local
  attention kernel runs there; all-to-all back. Needs the local head count divisible by cp.
- `te`: Transformer Engine's own CP inside its DotProductAttention (see model/attention.py). TE knows nothing
  of our tail padding, and its p2p CP needs an even sequence length per rank and a half-precision kernel; a
  video it cannot take is refused by name (`te_cp_problem`), and `auto` never picks it for such a video.

Gradient convention: parameters get each CP rank's share of the gradient; the data-parallel gradient
reduction over CP ranks adds the shares (as Megatron-LM does). Inputs: the training path (the model's
`gather_output=False`) gives each rank its own frames' share too. The public forward (whole input on every rank
-> whole output on every rank) treats its inputs as replicated tensors, as megatron's TP mappings do: the video
is scattered to the frame shards with an all-gathered gradient (`scatter_frames`) and the conditioning gets an
all-reduced one (`replicated`), so every rank holds the complete input gradient and the forward composes with
other replicated computation (a loss on the output plus a term on the input, a sampler's chain of steps).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from megatron_wan import parallel

CP_COMMS = ("auto", "ring", "ulysses", "te")
_aten = torch.ops.aten


@dataclass(frozen=True)
class FrameShard:
    """One CP rank's contiguous slice of a video's token grid (f, h, w), tail-padded to equal sizes."""

    grid: tuple[int, int, int]  # token grid of the whole video
    patch_t: int  # latent frames per token frame
    size: int = 1
    rank: int = 0

    @classmethod
    def current(cls, grid, patch_t: int) -> "FrameShard":
        """This process's shard under the initialized CP group (the whole video when CP=1)."""
        return cls(tuple(grid), patch_t, parallel.cp_size(), parallel.cp_rank())

    @property
    def frames_per_rank(self) -> int:
        return math.ceil(self.grid[0] / self.size)

    @property
    def first_frame(self) -> int:
        """Global index of this rank's first token frame (its RoPE frame offset)."""
        return self.rank * self.frames_per_rank

    @property
    def local_grid(self) -> tuple[int, int, int]:
        return (self.frames_per_rank, *self.grid[1:])

    def valid_frames(self, rank: int | None = None) -> int:
        """Real (unpadded) token frames held by `rank` (default: this one)."""
        start = (self.rank if rank is None else rank) * self.frames_per_rank
        return max(0, min(self.grid[0] - start, self.frames_per_rank))

    def valid_tokens(self, rank: int) -> int:
        return self.valid_frames(rank) * self.grid[1] * self.grid[2]

    @property
    def valid_latent_frames(self) -> int:
        """Real latent frames of this rank's slice: the ones its loss counts."""
        return self.valid_frames() * self.patch_t

    @property
    def padded(self) -> bool:
        return self.size * self.frames_per_rank != self.grid[0]

    def local_latents(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's latent frames of x [B, C, F, H, W], zero-padded at the video's tail: [B, C, k*p_t, H, W]."""
        if self.size == 1:
            return x
        n = self.frames_per_rank * self.patch_t
        start = self.first_frame * self.patch_t
        part = x[:, :, start:start + n]
        if part.shape[2] < n:
            pad = x.new_zeros(*x.shape[:2], n - part.shape[2], *x.shape[3:])
            part = torch.cat([part, pad], dim=2)
        return part.contiguous()  # its own storage: the graph keeps this rank's frames, not the whole input

    def local_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of per-token values [B, f*h*w, ...] of the whole video (frame-major, as the tokens),
        zero-padded at the video's tail: [B, frames_per_rank*h*w, ...]."""
        if self.size == 1:
            return values
        per_frame = self.grid[1] * self.grid[2]
        start, n = self.first_frame * per_frame, self.frames_per_rank * per_frame
        part = values[:, start:start + n]
        if part.shape[1] < n:
            pad = values.new_zeros(values.shape[0], n - part.shape[1], *values.shape[2:])
            part = torch.cat([part, pad], dim=1)
        return part


# -- collectives with the autograd rules CP needs ---------------------------------------------------

class _ScatterFrames(torch.autograd.Function):
    """Split along dim 0 over the group, backward all-gathers: megatron's scatter to the sequence-parallel region
    (whose gather allocates on CUDA), for any device."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.size = group, dist.get_world_size(group)
        return x.chunk(ctx.size)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.size)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts), None


def scatter_frames(x: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """`shard.local_latents(x)` of an x [B, C, F, H, W] that every CP rank holds whole, whose gradient is the
    whole input's on every rank: split over the CP group along the tail-padded frame axis, backward all-gather."""
    if shard.size == 1:
        return x
    frames = shard.size * shard.frames_per_rank * shard.patch_t
    if x.shape[2] < frames:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], frames - x.shape[2], *x.shape[3:])], dim=2)
    return _ScatterFrames.apply(x.movedim(2, 0), parallel.cp_group()).movedim(0, 2).contiguous()


def replicated(t: torch.Tensor | None, shard: FrameShard) -> torch.Tensor | None:
    """A tensor every CP rank holds whole and uses for its own tokens (text, image, timestep): the identity,
    whose gradient is all-reduced over CP (megatron's copy to the model-parallel region, on the CP group)."""
    if t is None or shard.size == 1 or not t.requires_grad:
        return t
    return copy_to_tensor_model_parallel_region(t, group=parallel.cp_group())


class _GatherTokens(torch.autograd.Function):
    """All-gather of [s_local, ...] over CP; every rank goes on to the same loss, so the backward keeps
    this rank's own slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.size)[ctx.rank], None


def gather_tokens(tokens: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """Every rank's tokens [s_local, B, ...] -> the whole video's [f*h*w, B, ...] (padding dropped)."""
    if shard.size == 1:
        return tokens
    whole = _GatherTokens.apply(tokens, parallel.cp_group())
    return whole[: math.prod(shard.grid)]


class _SumSharedLoss(torch.autograd.Function):
    """All-reduce (sum) whose result every rank turns into the same loss: the backward is the identity,
    so each rank back-propagates only its own term and the CP gradient reduction adds them."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def whole_video_sum(local: torch.Tensor, shard: FrameShard) -> torch.Tensor:
    """Sum of per-rank partial sums over the CP group (identity when CP=1)."""
    return local if shard.size == 1 else _SumSharedLoss.apply(local, parallel.cp_group())


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 (one equal part per rank); its gradient is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group), None


# -- Ulysses ----------------------------------------------------------------------------------------

def check_ulysses_heads(local_heads: int, cp: int) -> None:
    """Ulysses moves heads between CP ranks: the heads of one TP rank must split evenly over them."""
    if local_heads % cp:
        raise ValueError(
            f"cp_comm=ulysses: {local_heads} attention heads per tensor-parallel rank do not split over "
            f"context_parallel={cp}; use cp_comm=ring, or a CP size that divides the heads"
        )


def ulysses_attention(q, k, v, shard: FrameShard, attend) -> torch.Tensor:
    """q, k, v [s_local, b, n, d] -> [s_local, b, n*d]; `attend` is a local kernel over [s, b, n', d]."""
    group, cp = parallel.cp_group(), shard.size
    s, b, n, d = q.shape
    check_ulysses_heads(n, cp)
    # [3, s, b, cp, n/cp, d] -> destination head group first: [cp, 3, s, b, n/cp, d]
    qkv = torch.stack([q, k, v]).unflatten(3, (cp, n // cp)).permute(3, 0, 1, 2, 4, 5)
    qkv = _AllToAll.apply(qkv, group)  # now dim 0 is the source rank = the sequence chunk
    q, k, v = qkv.permute(1, 0, 2, 3, 4, 5).flatten(1, 2).unbind(0)  # each [cp*s, b, n/cp, d]
    keys = sum(shard.valid_tokens(r) for r in range(cp))  # padding sits at the video's tail
    out = attend(q, k[:keys], v[:keys])  # [cp*s, b, n/cp*d]
    out = _AllToAll.apply(out.view(cp, s, b, n // cp * d), group)  # dim 0: source head group
    return out.permute(1, 2, 0, 3).reshape(s, b, n * d)


# -- which implementation runs (plain decisions, tested on CPU) ----------------------------------------

HALF = (torch.bfloat16, torch.float16)
FLASH_HEAD_DIMS = range(8, 257, 8)  # head dims the flash kernels take: multiples of 8 up to 256 (torch's sdp_utils,
#                                      flash-attn 2; TE's fused attention likewise)


def kernel_for_call(backend: str, dtype: torch.dtype, device_type: str, head_dim: int) -> str:
    """The kernel one attention call runs: flash-attn and TE (and ring attention's flash kernel) only on fp16/bf16
    CUDA tensors with a head dim in FLASH_HEAD_DIMS (flash-attn raises on others, TE falls back to its unfused path,
    which holds the whole score matrix), sdpa otherwise."""
    if backend in ("flash", "te") and (device_type != "cuda" or dtype not in HALF or head_dim not in FLASH_HEAD_DIMS):
        return "sdpa"
    return backend


def ring_kernel(dtype: torch.dtype, device_type: str, head_dim: int) -> str:
    """The local kernel of ring attention's chunks (each returns the log-sum-exp the merge needs): torch's CPU flash
    kernel on CPU; on CUDA torch's flash kernel where kernel_for_call would run a flash kernel, else its
    memory-efficient one (fp32, other head dims)."""
    if device_type == "cpu":
        return "cpu"
    return "flash" if kernel_for_call("flash", dtype, device_type, head_dim) == "flash" else "efficient"


def kernel_heads(local_heads: int, cp: int, cp_comm: str | None) -> int:
    """Heads the local attention kernel sees: after Ulysses' all-to-all each CP rank holds local_heads / cp of
    them over the whole sequence; otherwise all of the TP rank's heads."""
    return local_heads // cp if cp > 1 and cp_comm == "ulysses" else local_heads


def te_cp_problem(cp: int, token_frames: int, tokens_per_frame: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why Transformer Engine's p2p context parallelism cannot run this video (None when it can).

    TE's CP (transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py) splits every
    rank's sequence in two halves ("Sequence length per GPU needs to be divisible by 2!"), attends to every key
    it is given (tail padding would be attended to), and with sbhd tensors runs only its fused (cuDNN) kernel,
    which takes fp16/bf16 and head dims that are multiples of 8."""
    if token_frames % cp:
        return (f"the video's {token_frames} token frames do not split evenly over context_parallel={cp} "
                f"(TE's CP would attend to our tail padding)")
    if (token_frames // cp) * tokens_per_frame % 2:
        return f"{(token_frames // cp) * tokens_per_frame} tokens per CP rank: TE's p2p CP needs an even number"
    if dtype not in HALF:
        return f"TE's CP runs only its fp16/bf16 fused kernel; the attention inputs are {dtype}"
    if head_dim % 8:
        return f"TE's fused attention needs a head dim that is a multiple of 8, found {head_dim}"
    return None


def resolve_cp_comm(name: str, backend: str, verified=()) -> str:
    """The CP exchange a model is built for. `auto` -> `te` only when the attention backend is Transformer Engine
    and TE's CP is in `verified` (passed gpu_check on a GPU); else `ring`. Per forward, `cp_comm_for_call` may
    still turn an automatic `te` into `ring` for a video TE's CP cannot take."""
    if name not in CP_COMMS:
        raise ValueError(f"cp_comm: expected one of {CP_COMMS}, found {name!r}")
    if name == "auto":
        return "te" if backend == "te" and "te" in verified else "ring"
    if name == "te" and backend != "te":
        raise ValueError(f"cp_comm='te' is Transformer Engine's own context parallelism; it needs "
                         f"attention_backend='te', found {backend!r} (use ring or ulysses)")
    return name


def cp_comm_for_call(built: str, requested: str, shard: "FrameShard", head_dim: int, dtype: torch.dtype) -> str:
    """The CP exchange of one self-attention call: `built` (resolve_cp_comm's) unless it is TE's and TE refuses
    this video: then `ring` when the choice was automatic, and an error naming the reason when it was asked for."""
    if built != "te":
        return built
    problem = te_cp_problem(shard.size, shard.grid[0], shard.grid[1] * shard.grid[2], head_dim, dtype)
    if problem is None:
        return "te"
    if requested == "auto":
        return "ring"
    raise ValueError(f"cp_comm='te': {problem}; use cp_comm=ring or ulysses (or auto) for this video")


def cp_comm_problem(cp_comm: str, backend: str, cp: int, heads_per_tp: int, head_dim: int, dtype: torch.dtype,
                    token_grids=()) -> str | None:
    """Why an explicitly asked-for `cp_comm` cannot run a configuration (None when it can): `token_grids` are the
    token grids (f, h, w) of the data it will see; `dtype` the attention inputs' (bf16 under autocast)."""
    if cp == 1 or cp_comm in ("auto", "ring"):
        return None
    if cp_comm == "ulysses":
        return None if heads_per_tp % cp == 0 else f"{heads_per_tp} heads per TP rank do not split over CP={cp}"
    if backend != "te":
        return f"cp_comm=te is Transformer Engine's CP; it needs attention_backend=te, found {backend!r}"
    for f, h, w in token_grids or [(cp, 2, 1)]:
        problem = te_cp_problem(cp, f, h * w, head_dim, dtype)
        if problem:
            return problem
    return None


# -- ring -------------------------------------------------------------------------------------------

def _kernel_forward(q, k, v):
    """Attention over [b, n, s, d] with its log-sum-exp [b, n, s] (fp32), and what its backward needs (the kernel
    and its own outputs)."""
    kernel = ring_kernel(q.dtype, q.device.type, q.shape[-1])
    if kernel == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse, (kernel,)
    if kernel == "flash":
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = _aten._scaled_dot_product_flash_attention(q, k, v)
        return out, lse, (kernel, cum_q, cum_k, seed, offset)
    out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return out, lse[..., : q.shape[2]], (kernel, lse, seed, offset)


def _kernel_backward(dout, q, k, v, out, lse, extra):
    """Gradients of one K/V chunk's attention given the *merged* output and log-sum-exp."""
    kernel, *extra = extra
    if kernel == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False)
    if kernel == "flash":  # the chunk's own lengths (the ring's chunks differ where the video is padded)
        cum_q, cum_k, seed, offset = extra
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), cum_q, cum_k, q.shape[2], k.shape[2], 0.0, False, seed, offset)
    kernel_lse, seed, offset = extra
    kernel_lse = kernel_lse.clone()
    kernel_lse[..., : q.shape[2]] = lse  # the kernel's own (row-padded) layout
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, kernel_lse, seed, offset, 0.0, [True, True, True, False])
    return dq, dk, dv


class _Ring:
    """Send to the next CP rank, receive from the previous one (buffers of one shape)."""

    def __init__(self, group):
        self.group = group
        ranks = dist.get_process_group_ranks(group)
        me = dist.get_group_rank(group, dist.get_rank())
        self.me, self.size = me, len(ranks)
        self.next, self.prev = ranks[(me + 1) % self.size], ranks[(me - 1) % self.size]

    def start(self, buffer):
        incoming = torch.empty_like(buffer)
        ops = [dist.P2POp(dist.isend, buffer.contiguous(), self.next, self.group),
               dist.P2POp(dist.irecv, incoming, self.prev, self.group)]
        return incoming, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(pending):
        incoming, requests = pending
        for r in requests:
            r.wait()
        return incoming


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, group):
        """q, k, v [b, n, s, d]; valid[r] = real keys held by CP rank r (a tail prefix of its chunk)."""
        ring = _Ring(group)
        kv, out, lse, extra = torch.stack([k, v]), None, None, None
        for i in range(ring.size):
            pending = ring.start(kv) if i < ring.size - 1 else None  # overlaps with this chunk's compute
            n = valid[(ring.me - i) % ring.size]
            if n:
                o, chunk_lse, chunk_extra = _kernel_forward(q, kv[0, :, :, :n].contiguous(),
                                                             kv[1, :, :, :n].contiguous())
                extra = extra or chunk_extra
                if out is None:
                    out, lse = o.float(), chunk_lse
                else:
                    merged = torch.logaddexp(lse, chunk_lse)
                    out = (out * (lse - merged).exp().unsqueeze(-1)
                           + o.float() * (chunk_lse - merged).exp().unsqueeze(-1))
                    lse = merged
            if pending is not None:
                kv = ring.finish(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.valid, ctx.group, ctx.extra = valid, group, extra
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # travels with the chunk it belongs to
        for i in range(ring.size):
            pending = ring.start(kv) if i < ring.size - 1 else None
            n = ctx.valid[(ring.me - i) % ring.size]
            if n:
                grads = _kernel_backward(dout, q, kv[0, :, :, :n].contiguous(), kv[1, :, :, :n].contiguous(),
                                         out, lse, ctx.extra)
                dq += grads[0]
                dkv[0, :, :, :n] += grads[1]
                dkv[1, :, :, :n] += grads[2]
            dkv = ring.finish(ring.start(dkv))  # after the last step it is home, complete
            if pending is not None:
                kv = ring.finish(pending)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q, k, v, shard: FrameShard) -> torch.Tensor:
    """q, k, v [s_local, b, n, d] -> [s_local, b, n*d], attending to every CP rank's real keys."""
    s, b, n, d = q.shape
    valid = [shard.valid_tokens(r) for r in range(shard.size)]
    heads_first = [t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v)]
    out = _RingAttention.apply(*heads_first, valid, parallel.cp_group())
    return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
