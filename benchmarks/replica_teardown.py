"""Stress check: two data-parallel replicas agree, then destroy their gloo process group, many times.

Each round does what a replica's task does at its end (napari_gama_ir.train.distributed): a few
:meth:`Replica.together` agreements, then ``destroy_process_group()`` at once (the task collects
garbage in between, which only narrows the window this widens). A round whose
teardown takes longer than ``--stall`` seconds counts as a hang: the script prints the stuck
replica's stacks and stops. ``--load`` busy processes stand in for a loaded CI machine, where torch's
gloo thread is more often descheduled between finishing a collective and dropping its tensors.

    python benchmarks/replica_teardown.py --rounds 300 --load 6
    # the code of an older commit (git worktree add /tmp/base OLD_COMMIT first)
    PYTHONPATH=/tmp/base/src python benchmarks/replica_teardown.py --rounds 300 --load 6
"""

from __future__ import annotations

import argparse
import faulthandler
import multiprocessing
import sys
import tempfile
import time
from datetime import timedelta


def _busy() -> None:
    while True:
        pass


def _replica(rank: int, rounds: int, stall: float, folder: str, outcome) -> None:
    import torch

    from napari_gama_ir.train.trainer import Replica

    torch.set_num_threads(1)
    for round_index in range(rounds):
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/round-{round_index}", rank=rank, world_size=2,
            timeout=timedelta(seconds=60),
        )
        replica = Replica(rank, 2)
        for _ in range(3):
            with replica.together():
                pass
        faulthandler.dump_traceback_later(stall, exit=True)  # a C thread: it fires while the GIL is held
        torch.distributed.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
        del replica
        outcome[rank] = round_index + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--load", type=int, default=0, help="busy processes beside the replicas")
    parser.add_argument("--stall", type=float, default=20.0, help="seconds of teardown counted as a hang")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    busy = [spawn.Process(target=_busy, daemon=True) for _ in range(args.load)]
    for process in busy:
        process.start()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder, spawn.Manager() as manager:
        outcome = manager.dict({0: 0, 1: 0})
        replicas = [spawn.Process(target=_replica, args=(rank, args.rounds, args.stall, folder, outcome))
                    for rank in range(2)]
        for process in replicas:
            process.start()
        for process in replicas:
            process.join()
        done, codes = min(outcome.values()), [process.exitcode for process in replicas]
    for process in busy:
        process.kill()
    seconds = time.monotonic() - started
    hung = any(codes)
    print(f"{done} of {args.rounds} rounds, {'a teardown hung' if hung else 'no hang'} "
          f"(exit codes {codes}, load {args.load}, {seconds:.0f} s)")
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(main())
