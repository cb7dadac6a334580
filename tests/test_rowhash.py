"""The hash of a row's input values (rowhash.py): what must hash alike, and what must not."""

from __future__ import annotations

import pyarrow as pa

from batchrunner.inputs.rowhash import input_hashes


def test_the_same_values_hash_alike_whatever_their_storage() -> None:
    plain = pa.table({"prompt": ["a", "b", None], "n": [1, 2, 3]})
    other = pa.table({
        "prompt": pa.chunked_array([pa.array(["a"], pa.large_string()),
                                    pa.array(["b", None], pa.large_string())]),
        "n": pa.array([1, 2, 3], pa.int32()),
    })
    dictionary = pa.table({"prompt": pa.array(["a", "b", None]).dictionary_encode(),
                           "n": [1, 2, 3]})
    expected = input_hashes(plain, ["prompt", "n"]).tolist()
    assert input_hashes(other, ["n", "prompt"]).tolist() == expected  # column order too
    assert input_hashes(dictionary, ["prompt", "n"]).tolist() == expected
    # a row's hash is its own: the same in a batch of one
    assert input_hashes(plain.slice(1, 1), ["prompt", "n"]).tolist() == expected[1:2]


def test_values_that_make_different_bodies_hash_apart() -> None:
    def one(values: list[object], kind: pa.DataType | None = None) -> int:
        return int(input_hashes(pa.table({"x": pa.array(values, kind)}), ["x"])[0])

    kinds = [one([1]), one([True]), one([1.0]), one(["1"]), one([[1]]), one([None], pa.int64())]
    assert len(set(kinds)) == len(kinds)
    assert one([""]) != one([None], pa.string())
    assert one(["a"]) != one(["b"])
    assert one([{"a": 1, "b": [2]}]) != one([{"a": 1, "b": [3]}])
    # only the columns asked for count
    table = pa.table({"x": ["a", "a"], "y": ["b", "c"]})
    assert len(set(input_hashes(table, ["x"]).tolist())) == 1
    assert len(set(input_hashes(table, ["x", "y"]).tolist())) == 2


def test_no_hash_is_zero() -> None:
    hashes = input_hashes(pa.table({"x": [str(i) for i in range(10_000)]}), ["x"])
    assert (hashes != 0).all() and len(set(hashes.tolist())) == 10_000
