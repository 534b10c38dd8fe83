"""Run a function on N local processes the way torchrun would (RANK, WORLD_SIZE, MASTER_* set): the benchmarks'
multi-process measurements and the multi-process tests."""

import io
import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_wan.parallel import free_port


def _worker(rank, world_size, port, env, fn, args, queue):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        buffer = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save(fn(*args), buffer)
        queue.put((rank, buffer.getvalue(), None))
    except BaseException:  # reported to the parent, which raises it with the rank named
        queue.put((rank, None, traceback.format_exc()))


def run_local(fn, world_size: int, *args, env: dict | None = None, timeout: float = 600.0) -> list:
    """Call `fn(*args)` on `world_size` spawned processes; return each rank's result in rank order.

    `fn` must be importable (module level) and return tensors, numbers, strings or containers of them
    (results travel through torch.save, loaded with weights_only). A failure on any rank is raised
    here with its traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, env or {}, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    try:
        for _ in range(world_size):
            rank, value, error = queue.get(timeout=timeout)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            else:
                results[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("local run failed\n" + "\n".join(errors))
    return results
