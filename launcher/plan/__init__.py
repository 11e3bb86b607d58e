"""``ftlaunch plan``: will a recipe fit, and how should it be sharded, before GPUs are allocated.

memory: model-state and activation bytes (pure arithmetic); model: the counts and shape of the
recipe's model, built on the meta device from its config alone; estimate: one row per ZeRO
stage and offload choice, the recommendation and the time estimate; report: table and JSON;
cluster: each node's GPUs and host memory, read through Ray.
"""
