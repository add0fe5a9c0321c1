"""Config root of ``python -m evaluation.run`` (apart from the training root, whose ``checkpoint`` group would take ``checkpoint=``)."""
