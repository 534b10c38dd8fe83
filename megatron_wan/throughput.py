"""The trainer's throughput metrics: FLOPs of a training step (SFT, DPO, Reg-DPO) from the model family's parameter
description (models.parameters), the device's peak FLOP/s, and a step timer. MFU = step FLOPs / seconds / peak."""

import re
import statistics
import time

import torch

from megatron_wan.models.parameters import Description


def step_flops(description: Description, grid, text_len: int, pairs: int = 1, objective: str = "regdpo",
               pair_mode: str = "batched", lora_rank: int = 0, recompute: bool = False, targets=None) -> dict:
    """FLOPs of one training step on `pairs` pairs (SFT: on the `pairs` winners), by part, plus "total".

    The trained model's passes cost forward + backward = 3 forwards (model-FLOPs convention: a backward
    is two forwards, even where LoRA leaves base weights without gradients). DPO and Reg-DPO also run the
    frozen reference forward on winner and loser (no adapters: `adapter` disables them). `sequential`
    pairs measure each loser once more without a graph; `recompute` repeats the forward of the blocks.
    `lora_rank` > 0: adapters on `targets` (lora.targets; None: the family's defaults).
    """
    if objective not in ("sft", "dpo", "regdpo"):
        raise ValueError(f"objective: expected sft, dpo or regdpo, found {objective!r}")
    preference = objective != "sft"
    samples = pairs * (2 if preference else 1)

    def forward(batch, rank=lora_rank, blocks_only=False):
        return description.forward_flops(grid, text_len, batch, rank, targets, blocks_only)["total"]

    trained = forward(samples)
    parts = {
        "policy_forward": trained,
        "policy_backward": 2 * trained,
        "recompute": forward(samples, blocks_only=True) if recompute else 0,
        "loser_remeasure": forward(pairs) if preference and pair_mode == "sequential" else 0,
        "reference_forward": forward(2 * pairs, rank=0) if preference else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def time_it(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of fn() (CUDA synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DEVICE_PEAKS = {  # dense FLOP/s from the vendors' datasheets: (bf16 tensor core, tf32 tensor core, fp32 without TF32)
    "H100 SXM": (989.4e12, 494.7e12, 66.9e12), "H100 NVL": (835.5e12, 417.5e12, 60e12),
    "H100 PCIe": (756.5e12, 378e12, 51.2e12), "H200 SXM": (989.4e12, 494.7e12, 66.9e12),
    "H200 NVL": (835.5e12, 417.5e12, 60e12), "H800 SXM": (989.4e12, 494.7e12, 66.9e12),
    "H800 PCIe": (756.5e12, 378e12, 51.2e12), "GH200": (989.4e12, 494.7e12, 66.9e12),
    "A100": (312e12, 156e12, 19.5e12), "A800": (312e12, 156e12, 19.5e12),  # SXM and PCIe alike
    "L40S": (362e12, 183e12, 91.6e12),
}


def product_name(device: str) -> str | None:
    """The DEVICE_PEAKS key of a CUDA device name (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3" is the SXM
    part, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA A100-SXM4-80GB", ...), None for a GPU not in the table."""
    chip = re.search(r"\b(GH200|H100|H200|H800|A100|A800|L40S)\b", device)
    if chip is None:
        return None
    if chip[1] in ("H100", "H200", "H800"):  # the PCIe and NVL cards run at lower clocks and power than SXM
        form = "NVL" if re.search(r"\bNVL\b", device) else "PCIe" if "PCIE" in device.upper() else "SXM"
        return f"{chip[1]} {form}" if f"{chip[1]} {form}" in DEVICE_PEAKS else None
    return chip[1]


def table_peak(name: str, dtype: torch.dtype, tf32: bool) -> tuple[float, str]:
    """(peak FLOP/s, what it is) of GPU `name` from DEVICE_PEAKS (by its product_name): bf16/fp16 tensor cores, or
    for fp32 the TF32 tensor-core peak only when TF32 matmuls are enabled (torch.backends.cuda.matmul.allow_tf32),
    else plain FP32."""
    product = product_name(name)
    if product is None:
        return float("nan"), f"{name}: no table value"
    half, tf32_peak, fp32_peak = DEVICE_PEAKS[product]
    if dtype in (torch.bfloat16, torch.float16):
        return half, f"{name}: {product} table, {dtype} tensor cores"
    if tf32:
        return tf32_peak, f"{name}: {product} table, TF32 tensor cores (allow_tf32 on)"
    return fp32_peak, f"{name}: {product} table, FP32 (TF32 off)"


def peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): a GPU's table value (table_peak, with this process's TF32 setting), or
    on CPU a `size`^3 matmul in `dtype` timed here."""
    if torch.cuda.is_available():
        return table_peak(torch.cuda.get_device_name(), dtype, torch.backends.cuda.matmul.allow_tf32)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = time_it(lambda: a @ b, repeats=5)
    return 2 * size**3 / seconds, f"CPU {dtype} {size}^3 matmul timed"
