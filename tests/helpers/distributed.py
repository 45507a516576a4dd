"""Two CPU processes in one gloo group, for the multi-process training tests (DDP, FSDP2)."""

import socket

import torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _joined(rank, worker, port, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        worker(rank, *args)
        # both ranks done before either tears gloo down: a rank that exits while the other still works can abort
        # its gloo threads (SIGABRT, "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two(worker, *args):
    """Run ``worker(rank, *args)`` (a module-level function) in two processes of one gloo group, and wait for both."""
    import torch.multiprocessing as mp

    mp.spawn(_joined, args=(worker, _free_port(), args), nprocs=2, join=True)
