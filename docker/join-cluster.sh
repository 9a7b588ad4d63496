#!/bin/sh
# Join the Ray cluster at $RAY_HEAD_ADDRESS as a node with no CPUs and no GPUs, then run the given command.
#
# A Ray driver (tune.py) must run on a node of the cluster: ray.init(address=...) attaches to the raylet of
# its own machine. Joining with zero resources makes this container such a node while keeping every trial
# off it, so trials land on the GPU workers.
set -eu
ray start --address="${RAY_HEAD_ADDRESS:?RAY_HEAD_ADDRESS must name the Ray head, e.g. ray-head:6379}" \
    --num-cpus=0 --num-gpus=0 --disable-usage-stats
exec "$@"
