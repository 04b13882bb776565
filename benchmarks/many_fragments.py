"""Reading one tensor stored as many small fragments: time against the fragment count.

    python benchmarks/many_fragments.py [--counts 10000 20000 40000 80000] [--dir /tmp/ucp-frags]

Each count writes one data object holding ``n`` fragments of one float32 row of 4 elements (a
``[n, 4]`` tensor, one fragment per row, as a checkpoint saved by ``n`` ranks of a row-sharded
tensor would hold) and reads the whole tensor back through the read engine, verified. The time
per fragment stays flat: planning is linear (it was quadratic: 80,000 fragments took 63 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

from torch_ucp.metadata.checksums import DEFAULT_ALGORITHM, BlockGrid
from torch_ucp.metadata.schema import StoredBytes
from torch_ucp.storage.fragment_reader import BoxRead, FragmentReader
from torch_ucp.storage.store import open_store

BLOCK_BYTES, BLOCK_WIDTH = 64 << 10, 2 << 10


def measure(root: str, n: int) -> float:
    os.makedirs(os.path.join(root, "data-x"), exist_ok=True)
    data = torch.arange(n * 4, dtype=torch.float32)
    raw = data.numpy().tobytes()
    with open(os.path.join(root, "data-x", "0.bin"), "wb") as f:
        f.write(raw)
    grid = BlockGrid.for_fragment((1, 4), 4, BLOCK_BYTES, BLOCK_WIDTH)
    dest = torch.empty(n, 4)
    reads = []
    for i in range(n):
        sums = tuple(grid.checksums(memoryview(raw)[16 * i : 16 * i + 16], DEFAULT_ALGORITHM))
        stored = StoredBytes("data-x/0.bin", 16 * i, 16, sums)
        reads.append(BoxRead("w", stored, torch.float32, (i, 0), (1, 4), (0, 0), (1, 4), dest[i : i + 1]))
    reader = FragmentReader(open_store(root), checksum_algorithm=DEFAULT_ALGORITHM,
                            block_bytes=BLOCK_BYTES, block_width=BLOCK_WIDTH)
    t0 = time.perf_counter()
    reader.read(reads)
    seconds = time.perf_counter() - t0
    assert torch.equal(dest.reshape(-1), data)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[10_000, 20_000, 40_000, 80_000])
    p.add_argument("--dir", default="/tmp/ucp-frags")
    args = p.parse_args()
    print(f"{'fragments':>10} {'read s':>8} {'us/fragment':>12}")
    for n in args.counts:
        root = os.path.join(args.dir, str(n))
        shutil.rmtree(root, ignore_errors=True)
        s = measure(root, n)
        print(f"{n:>10} {s:>8.2f} {1e6 * s / n:>12.1f}", flush=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
