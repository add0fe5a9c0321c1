"""Fixtures of the launch tests."""

from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import LocalSlurm


@pytest.fixture
def local_slurm(tmp_path):
    """``local_slurm(**LocalSlurm options)``: a started local Slurm cluster under ``tmp_path``; every cluster a
    test starts is stopped when it ends (give clusters that may run at the same time their own ports)."""
    started: list[LocalSlurm] = []

    def start(**options) -> LocalSlurm:
        cluster = LocalSlurm(tmp_path / f"slurm{len(started)}", **options)
        started.append(cluster)
        cluster.start()
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
