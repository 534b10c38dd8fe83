"""Exact activation memory: the bytes autograd saves for backward (the step timer and device peaks are the
trainer's: megatron_wan.throughput)."""

import weakref

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
