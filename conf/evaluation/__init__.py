"""Config root of ``python -m launch.evaluate`` (apart from the training root, whose ``checkpoint`` group would take ``checkpoint=``)."""
