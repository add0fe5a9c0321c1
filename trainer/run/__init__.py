"""The run: ``train.run_training`` builds everything from the sub-configs and hands it to the loop.

``loop`` (the driver and the ``Component`` interface), ``components/`` (training metrics, validation,
checkpoints and stop signals, profiling), ``step`` (one optimizer step, any layout), ``optim`` (AdamW and
the LR schedule), ``metrics`` (the logger and its sinks), ``signals``, ``device`` (device, precision, peak
FLOP/s, memory), ``records`` (summary.json and metrics.jsonl, standard library only), ``config``.
"""
