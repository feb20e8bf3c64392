"""Run the FSDP2 test chain (tests/test_fsdp.py) N times and check every run gives the same bits.

    PYTHONPATH=src:tests python bench/fsdp_repeat.py --runs 10

Each run: a one-process DCP checkpoint, 3 ranks (parity, NaN, clipping, layer-wise, DCP), 2 ranks
(parity, HSDP, DCP resharding, DDP refusal, bad input), one process resuming the sharded checkpoints.
Prints one line per run and, at the end, whether the weight digests of all runs agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fsdp_worker  # noqa: E402
from test_fsdp import spawn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--three-only", action="store_true",
                        help="only the 3-rank run (parity, NaN, clipping, layer-wise, DCP at 3 ranks and 1 -> 3)")
    args = parser.parse_args()
    digests = []
    for run in range(args.runs):
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            fsdp_worker.one_process_checkpoint(out)
            three = spawn(3, ["parity", "nan_clip", "layerwise", "checkpoints"], out)
            two = {"digests": {}, "resharded": []}
            resumed = []
            if not args.three_only:
                two = spawn(2, ["parity_lite", "hsdp", "checkpoints", "ddp_layerwise", "bad_input"], out)
                resumed = fsdp_worker.one_process_resumes(out)
            final = torch.load(out / "final-3.pt", weights_only=True)
        digests.append(json.dumps([three["digests"], two["digests"],
                                   hashlib.sha256(b"".join(v.numpy().tobytes() for v in final.values())).hexdigest()],
                                  sort_keys=True))
        print(f"run {run + 1}/{args.runs}: passed in {time.time() - start:.0f} s; resharded "
              f"{three['resharded'] + two['resharded'] + resumed}", flush=True)
    same = len(set(digests)) == 1
    print(f"{args.runs} runs passed; weight digests identical across runs: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
