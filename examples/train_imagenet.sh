#!/usr/bin/env bash
# ProtoQuant on ImageNet-1k from the Hub, ConvNeXt-T backbone, on N GPUs of one machine (issue 12's recipe).
#
#   NUM_GPUS=8 CACHE=/nvme/protoquant bash examples/train_imagenet.sh
#
# What it does: streams ILSVRC/imagenet-1k (gated on the Hub: accept its terms and `huggingface-cli login` first;
# nothing is downloaded up front) through the frozen facebook/convnext-tiny-224 in bf16, one process per GPU, each
# reading its part of the stream (split by shard) and writing its shards of the feature cache; then k-means on a
# bounded sample (--kmeans_max_vectors), the linear probe on a bounded sample (--probe_max_samples), stage 1 on the
# cached maps, stage 2 on the on-disk concept-score table, top-10 sparsification, the gallery (a second read of the
# stream) and the evaluation on the validation split (ImageNet's test split has no labels). Every count (usage,
# k-means, dead concepts, accuracy) is global over the processes. A killed run resumes: the feature cache at shard
# granularity (rerun the same command), training at its last checkpoint (add --resume).
#
# Disk for the cache (float16), from the shapes, not measured: ConvNeXt-T's last stage at 224 px is 768 × 7 × 7, i.e.
# 75 264 bytes per image: 1 281 167 training images → 96.4 GB, 50 000 validation images → 3.8 GB. The stage-2 score
# table is 4 × K bytes per image while stage 2 runs (K = 2048: 10.5 GB, float32, in the cache folder, then removed).
#
# Concepts are frozen in stage 2 here (--train_concepts False), so its epochs read the score table; the job's default,
# grounded fine-tuning, trains the concepts and reads the whole map cache in every stage-2 epoch (drop the flag for it).
#
# Epochs shuffle 16 shards at a time (--shuffle_window_shards: 65 536 images, ~4.9 GB of cache in use at once) instead
# of a full permutation that touches every shard in every batch: a 96 GB cache need not fit in the page cache.
#
# Wall time: extraction takes N_images / (images/s of the backbone pass, all GPUs), one stage-1 epoch
# N_images / (stage-1 images/s), one stage-2 epoch N_images / (stage-2 images/s on the score table); the per-GPU
# throughputs come from `python benchmarks/bench_gpu_throughput.py` run on one of your GPUs, times the number of
# GPUs (data parallel, no cross-GPU traffic in extraction). No GPU has been available to this project's
# machines, so benchmarks/RESULTS.md has no GPU figures to fill in here yet (its opening paragraph says so).
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-8}
CACHE=${CACHE:-$HOME/.cache/protoquant}
OUTPUT=${OUTPUT:-runs/imagenet-convnext-t}

accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --mixed_precision bf16 examples/train_protoquant.py \
  --dataset ILSVRC/imagenet-1k --streaming --test_split validation \
  --backbone facebook/convnext-tiny-224 --image_size 224 \
  --num_concepts 2048 --mixed_precision bf16 --train_concepts False \
  --batch_size 256 --extraction_batch_size 256 \
  --stage1_epochs 3 --stage2_epochs 30 --sparsify_epochs 30 --top_k_per_class 10 \
  --kmeans_max_vectors 1000000 --probe_max_samples 200000 --shuffle_window_shards 16 \
  --cache_dir "$CACHE" --output_dir "$OUTPUT" "$@"
