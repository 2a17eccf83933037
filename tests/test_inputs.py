"""Which images a run takes (fmap_cli.inputs): the shard of a SLURM array task."""

from __future__ import annotations

import pytest

from fmap_cli.errors import UsageError
from fmap_cli.inputs import Shard, shard_from_env


def test_no_array_task_means_no_shard() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_JOB_ID": "17"}) is None


def test_array_task_id_counts_from_min() -> None:
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    assert shard_from_env(env) == Shard(1, 3)  # --array=4-6: task 5 is the second share


def test_array_task_id_without_count_is_refused() -> None:
    """Without the count every task would silently process every image."""
    for env in (
        {"SLURM_ARRAY_TASK_ID": "3"},
        {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"},
    ):
        with pytest.raises(UsageError) as caught:
            shard_from_env(env)
        assert str(caught.value) == ("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard K/N")


def test_array_task_outside_its_count_is_refused() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    with pytest.raises(UsageError, match=r"^SLURM_ARRAY_TASK_ID=7, SLURM_ARRAY_TASK_COUNT=3: not a valid shard"):
        shard_from_env(env)
