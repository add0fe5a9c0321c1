"""Config root of ``python -m launch.preprocess`` (the ``preprocess`` group: one recipe per source)."""
