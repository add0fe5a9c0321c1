"""The planner: will a layout fit, how fast will it run, what will the run cost (``python -m launch.plan``).

It rehearses the configured layout with the trainer's own construction code in a fake world of the
cluster's size (``planner.rehearsal``), reads each rank's bytes from the sharded parameters that code
produced, and adds the activations, transient buffers, FLOPs and communication of a step from documented
formulas (``planner.estimate``; a pipeline's schedule: ``planner.pipeline``); docs/planner.md has the model and
its validation against published runs.
"""
