"""Does a 2-process gloo run abort at exit when its process group is not destroyed? (issue 12, the heap policy)

Runs a minimal `accelerate launch --multi_gpu --num_processes 2` script (20 `gather` + `broadcast_object_list` calls,
nothing of this package) --runs times exiting as it is, and --runs times ending with `accelerator.end_training()`
(which destroys the process group), and counts the runs that failed and those whose output says "terminate called".

    python benchmarks/check_gloo_teardown.py --runs 12
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import sys, torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather
accelerator = Accelerator(cpu=True)
for _ in range(20):
    gather(torch.randn(1000) + accelerator.process_index)
    broadcast_object_list([accelerator.process_index], from_process=0)
if sys.argv[1] == "destroy":
    accelerator.end_training()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=12, help="launches per variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "exit.py"
        script.write_text(SCRIPT)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for mode in ("exit", "destroy"):
            failed = terminated = 0
            for _ in range(args.runs):
                result = subprocess.run(
                    ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", str(script), mode],
                    capture_output=True, text=True, env=env, timeout=300, check=False,
                )
                failed += result.returncode != 0
                terminated += "terminate called" in result.stdout + result.stderr
            label = "process group destroyed" if mode == "destroy" else "process group left to teardown"
            print(f"{label}: {failed} of {args.runs} runs failed, {terminated} with 'terminate called'", flush=True)


if __name__ == "__main__":
    sys.exit(main())
