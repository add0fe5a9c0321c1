"""Parallelism applied to the model from outside, in one fixed order (``parallelize.parallelize_llama``:
TP/SP -> activation checkpointing -> compile -> FSDP2), and the layout it works on.

``config`` (``parallel.*``, one dataclass per concern), ``dims`` (the validated layout and its device
meshes), ``distributed`` (process group and the small collectives), ``tensor_parallel``,
``activation_checkpointing`` (the policies: what each module keeps), ``parallelize``, ``build`` (meta ->
parallelise -> materialise -> initialise) and ``initialize`` (identical weights under every layout).
"""
