"""The parameter description of a model family: every parameter, linear layer and attention product of one
config, written out once by the family (`models/<family>/params.py`, with `Builder`) and read by everything that
depends on the model's structure.

Derived from it, for any family: the parameter table (our names, full shapes, TP split dims: the state-dict
adapter's conversions and TP split/merge), parameter counts (whole, one block and its TP-split part, LoRA adapters
for any `lora.targets`), the video tokens of a latent grid and the FLOPs of a forward. A multiply-add counts 2
FLOPs and only matrix products are counted (linears, patch convolutions, attention's QK^T and AV), as
torch.utils.flop_counter.FlopCounterMode counts them; norms, RoPE, softmax, activations and modulations are
elementwise and left out.

Each linear and attention reads one token stream per sample: "video" (the patched latent grid), "text"
(`text_len` tokens), or a stream of fixed length the family names (e.g. "time": 1, "image": 257 CLIP tokens).
Totals are for the whole video: under context parallelism each CP rank does 1/CP of the video tokens' work,
under tensor parallelism each TP rank 1/TP.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str  # ours
    shape: tuple  # full, unsplit
    split: int | None  # tensor-parallel partition dim, None when replicated
    block: int | None = None  # the transformer block holding it, None outside the blocks


@dataclass(frozen=True)
class Linear:
    """A linear layer (or, with `kernel`, a patch convolution: a linear on each patch) on one token stream."""

    name: str  # module name, ours
    in_features: int
    out_features: int
    tokens: str  # the token stream it reads
    part: str  # the FLOP component it counts under
    parallel: str | None = None  # "column" / "row": a tensor-parallel linear (LoRA adapts these); None: whole
    kernel: tuple = ()  # patch convolution: weight [out, in_features / prod(kernel), *kernel]
    block: int | None = None

    def params(self) -> list[Param]:
        """Its weight and bias."""
        shape = ((self.out_features, self.in_features // math.prod(self.kernel), *self.kernel) if self.kernel
                 else (self.out_features, self.in_features))
        split = {"column": 0, "row": 1}.get(self.parallel)
        return [Param(f"{self.name}.weight", shape, split, self.block),
                Param(f"{self.name}.bias", (self.out_features,), 0 if split == 0 else None, self.block)]


@dataclass(frozen=True)
class Attention:
    """The two products of softmax attention, QK^T and AV over all heads, of `queries` over `keys` tokens."""

    queries: str
    keys: str
    width: int  # heads x head dim
    part: str
    block: int | None = None


def lora_target(module_name: str, targets: Sequence[str]) -> bool:
    """Whether LoRA adapts the (tensor-parallel) linear `module_name`: its last name part is one of `targets`."""
    return module_name.rsplit(".", 1)[-1] in targets


@dataclass(frozen=True)
class Description:
    """Every parameter, linear and attention of one config (`Builder` writes it), and what derives from them."""

    params: tuple  # Param, in state-dict order
    linears: tuple  # Linear
    attentions: tuple  # Attention
    patch: tuple  # latent patch (frames, height, width)
    fixed_tokens: Mapping[str, int]  # token streams of fixed length per sample
    lora_targets: tuple  # the family's default lora.targets

    def video_tokens(self, grid) -> int:
        """Tokens of a latent grid (frames, height, width) after patching."""
        if any(n % p for n, p in zip(grid, self.patch)):
            raise ValueError(f"latent grid {list(grid)} is not divisible by patch {self.patch}")
        return math.prod(n // p for n, p in zip(grid, self.patch))

    def tokens(self, grid, text_len: int) -> dict:
        """Tokens of each stream in one sample."""
        return {"video": self.video_tokens(grid), "text": text_len, **self.fixed_tokens}

    def adapted(self, targets=None) -> list[Linear]:
        """The linears LoRA adapts for `targets` (None: the family's defaults), as lora.apply_lora matches them."""
        targets = self.lora_targets if targets is None else tuple(targets)
        found = [lin for lin in self.linears if lin.parallel and lora_target(lin.name, targets)]
        if not found:
            raise ValueError(f"lora targets {list(targets)} match no parallel linear of this model")
        return found

    def count(self, lora_rank: int = 0, targets=None) -> dict:
        """Parameters: "block" (one block), "block_split" (its part split over TP ranks), "other" (outside the
        blocks), "split" (every TP-split one), "total", and "lora" (adapters of rank `lora_rank` on `targets`, all
        blocks; 0 without a rank)."""
        size = {"block": 0, "block_split": 0, "other": 0, "split": 0, "total": 0}
        for p in self.params:
            n = math.prod(p.shape)
            size["total"] += n
            size["split"] += n if p.split is not None else 0
            size["other"] += n if p.block is None else 0
            size["block"] += n if p.block == 0 else 0
            size["block_split"] += n if p.block == 0 and p.split is not None else 0
        adapted = self.adapted(targets) if lora_rank else []
        return {**size, "lora": sum(lora_rank * (lin.in_features + lin.out_features) for lin in adapted)}

    def forward_flops(self, grid, text_len: int, batch: int = 1, lora_rank: int = 0, targets=None,
                      blocks_only: bool = False) -> dict:
        """FLOPs of one forward of `batch` samples, per component (summed over blocks), plus "total".

        `lora_rank` > 0 adds the adapters' down [in -> r] and up [r -> out] products on each adapted linear's
        tokens (`targets`, None: the family's defaults). `blocks_only`: only the transformer blocks (what
        activation checkpointing runs again)."""
        tokens = self.tokens(grid, text_len)
        out = {}

        def add(part, flops):
            out[part] = out.get(part, 0) + batch * flops

        for lin in self.linears:
            if not blocks_only or lin.block is not None:
                add(lin.part, 2 * tokens[lin.tokens] * lin.in_features * lin.out_features)
        for a in self.attentions:
            if not blocks_only or a.block is not None:
                add(a.part, 2 * 2 * tokens[a.queries] * a.width * tokens[a.keys])
        if lora_rank:
            for lin in self.adapted(targets):
                if not blocks_only or lin.block is not None:
                    add("lora", 2 * tokens[lin.tokens] * lora_rank * (lin.in_features + lin.out_features))
        out["total"] = sum(out.values())
        return out


class Builder:
    """Writes a Description: parameters, linears and attentions in state-dict order; `block` is the transformer
    block being written (None outside the blocks)."""

    def __init__(self):
        self.params, self.linears, self.attentions = [], [], []
        self.block = None

    def param(self, name: str, shape: tuple, split: int | None = None) -> None:
        self.params.append(Param(name, tuple(shape), split, self.block))

    def norm(self, name: str, size: int, bias: bool = True, split: int | None = None) -> None:
        self.param(f"{name}.weight", (size,), split)
        if bias:
            self.param(f"{name}.bias", (size,))

    def linear(self, name: str, in_features: int, out_features: int, tokens: str, part: str,
               parallel: str | None = None, kernel: tuple = ()) -> None:
        lin = Linear(name, in_features, out_features, tokens, part, parallel, tuple(kernel), self.block)
        self.linears.append(lin)
        self.params.extend(lin.params())

    def attention(self, queries: str, keys: str, width: int, part: str) -> None:
        self.attentions.append(Attention(queries, keys, width, part, self.block))

    def build(self, patch, fixed_tokens: Mapping[str, int], lora_targets) -> Description:
        return Description(tuple(self.params), tuple(self.linears), tuple(self.attentions), tuple(patch),
                           dict(fixed_tokens), tuple(lora_targets))
