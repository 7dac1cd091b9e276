"""Dealing the output's shards out to several processes."""

from __future__ import annotations

import pytest

from zero2merged.stages.shards import deal


def test_one_process_writes_every_shard_in_file_order():
    sizes = {"b": 1, "a": 9, "c": 5}
    assert deal(sizes, 1) == [["b", "a", "c"]]


def test_largest_first_to_the_least_loaded_each_share_in_file_order():
    sizes = {"s1": 5, "s2": 4, "s3": 3, "s4": 3, "s5": 3}
    shares = deal(sizes, 2)
    assert shares == [["s1", "s4"], ["s2", "s3", "s5"]]  # 5, 4, then 3s to whoever holds less: loads 8 and 10
    assert sorted(name for share in shares for name in share) == sorted(sizes)


@pytest.mark.parametrize("count", [2, 3, 7])
def test_every_shard_once_and_no_share_much_heavier_than_the_rest(count):
    sizes = {f"model-{i:05d}": (i * 37) % 11 + 1 for i in range(20)}
    shares = deal(sizes, count)
    assert len(shares) == count
    assert sorted(name for share in shares for name in share) == sorted(sizes)
    for share in shares:
        assert share == sorted(share)
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy: within one shard of each other


def test_more_processes_than_shards_leaves_some_idle():
    assert deal({"a": 1, "b": 2}, 3) == [["b"], ["a"], []]
