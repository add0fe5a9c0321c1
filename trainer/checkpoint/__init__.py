"""Checkpoints: everything a run needs to continue, saved and loaded under any layout.

``config`` (``checkpoint.*``), ``checkpointer`` (the ``Checkpointer``: atomic saves, retention, resume;
the checkpoint directory's layout), ``dcp`` (tensors in and out of DCP without unpickling arbitrary
objects), ``meta`` (``meta.json``: the non-tensor half), ``hf_interop`` (Hugging Face export/import).
*When* a run saves is the loop's checkpointing component (trainer/run/components/checkpointing.py).
"""
