"""Exact activation memory (bytes autograd saves for backward) and a step timer."""

import statistics
import time
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Peak and total bytes of the storages autograd keeps for backward, parameters excluded.

    Each distinct storage counts once while any graph node still holds it; it is released when the
    last holder is freed (after its backward ran, or with the graph). Exact, not sampled. `exclude`d
    tensors are recognized by storage and by identity (ZeRO-3 gathers a parameter into a new storage).
    """

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.exclude_ids = {id(p) for p in exclude}
        self.live: dict[int, list] = {}  # storage ptr -> [bytes, holders]
        self.current = self.peak = self.total = 0

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or id(t) in self.exclude_ids or t.device.type == "meta":
            return t
        entry = self.live.setdefault(ptr, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current += entry[0]
            self.total += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        handle = _Saved(t)
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Saved) else h

    def __enter__(self):
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


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


DEVICE_PEAKS = {  # dense FLOP/s from the vendors' tables: (bf16 tensor core, tf32 tensor core, fp32 without TF32)
    "H100": (989.4e12, 494.7e12, 66.9e12), "H200": (989.4e12, 494.7e12, 66.9e12),
    "H800": (989.4e12, 494.7e12, 66.9e12), "A100": (312e12, 156e12, 19.5e12), "A800": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
}


def table_peak(name: str, dtype: torch.dtype, tf32: bool) -> tuple[float, str]:
    """(peak FLOP/s, what it is) of GPU `name` from DEVICE_PEAKS: bf16/fp16 tensor cores, or for fp32 the TF32
    tensor-core peak only when TF32 matmuls are enabled (torch.backends.cuda.matmul.allow_tf32), else plain FP32."""
    for key, (half, tf32_peak, fp32_peak) in DEVICE_PEAKS.items():
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half, f"{name} table, {dtype} tensor cores"
            if tf32:
                return tf32_peak, f"{name} table, TF32 tensor cores (allow_tf32 on)"
            return fp32_peak, f"{name} table, FP32 (TF32 off)"
    return float("nan"), f"{name}: no table value"


def peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): a GPU's table value (table_peak, with this process's TF32 setting), or
    on CPU a `size`^3 matmul in `dtype` timed here."""
    if torch.cuda.is_available():
        return table_peak(torch.cuda.get_device_name(), dtype, torch.backends.cuda.matmul.allow_tf32)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    seconds = time_it(lambda: a @ b, repeats=5)
    return 2 * size**3 / seconds, f"CPU {dtype} {size}^3 matmul timed"
