"""The trainer: everything that turns a model and data into a trained checkpoint, in three rooms.

- ``trainer.parallel``: how the model is split over processes and what it keeps for backward: the layout
  and its meshes (``ParallelDims``), tensor/sequence parallelism, activation-checkpointing policies, FSDP2,
  compile, and the one path that builds a model for a layout (``build_model``).
- ``trainer.checkpoint``: what a run saves and loads: DCP checkpoints under any layout, their ``meta.json``,
  Hugging Face export/import.
- ``trainer.run``: the run itself: set-up (``run_training``), the loop and its components, the train step,
  the optimizer, metrics, device facts and run-directory records.

The trainer imports model/ and data/ below it and nothing above it (conf/, evaluation/, planner/, launch/):
it receives its sub-configs from the entry point (launch/train.py). docs/architecture.md has the map.
"""
