"""Hydra configs. Importing this package registers the typed schema (``conf/schema.py``) that
``config.yaml``'s defaults list names first, so every YAML group is validated against it."""

from conf.schema import register_schema

register_schema()
