"""A gloo process group for the tests' torch.multiprocessing workers, left the way selfsup's torchrun workers
leave (selfsup.distributed.shutdown + leave_worker): after a body that finished, a barrier, the group destroyed
and os._exit(0), skipping the interpreter's teardown, where a worker that had written its files was seen to
abort now and then (SIGABRT, "terminate called without an active exception": gloo's C++ threads at exit; CI
saw it once in test_masked_distillation_two_processes_match_one[dinov2]). After an error the group is
destroyed and the error raised, which mp.spawn reports."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from selfsup.distributed import leave_worker, shutdown


@contextmanager
def gloo_group(rank: int, world: int, port: int | None = None, init_file: str | None = None) -> Iterator[None]:
    """Join a ``world``-process gloo group on 127.0.0.1:``port`` (or through ``init_file``), one thread each."""
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init = f"file://{init_file}" if init_file else None
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown(barrier=True)
    leave_worker()
