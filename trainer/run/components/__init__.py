"""The training loop's components (trainer/run/loop.py), one concern per module:

- ``train_log``: the training metrics of each logged step (loss, lr, gradient norm, throughput, MFU, memory);
- ``validation``: the validation loss every ``trainer.eval_every`` steps;
- ``checkpointing``: checkpoints every ``checkpoint.every_steps`` / ``every_minutes``, at the end, and on a
  stop signal (then the loop stops);
- ``profiling``: a torch.profiler trace of ``profile.steps`` steps.

Task evaluation during training is evaluation's own component (evaluation/training.py), handed to the run by
the entry point (launch/train.py). A new component is a module here (or in its own package) and its test.
"""
