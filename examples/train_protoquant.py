"""Two-stage ProtoQuant training with Accelerate, in one process or several.

The job (feature cache → k-means concepts → stage 1 codebook → stage 2 sparse head → saved
Hugging Face folder) is `protoquant_hf.training.train_protoquant`; this script is its command line,
the same as `protoquant train`. Everything global is reduced across processes (concept usage,
k-means initialisation, dead-concept decisions, metrics), so N processes give the same model
semantics as one process with an N-times larger batch.

    python examples/train_protoquant.py --output_dir runs/animal-mnist
    # two processes on one machine (DDP over gloo on a CPU-only machine, NCCL on GPUs):
    accelerate launch --multi_gpu --num_processes 2 examples/train_protoquant.py --output_dir runs/animal-mnist-2p
    # continue an interrupted run from its last epoch:
    python examples/train_protoquant.py --output_dir runs/animal-mnist --resume

On a machine without GPUs, accelerate 1.15 runs `accelerate launch --num_processes 2` (without
`--multi_gpu`) as a single process; `--multi_gpu` makes it start the processes with gloo.
Run with --help for every option.
"""

import sys

from protoquant_hf.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
