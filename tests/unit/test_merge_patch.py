"""JSON merge patches (RFC 7386) as the reconcile applies and derives them (``objects.merge_patch``,
``objects.merge_diff``): the status is decided in memory and sent in one patch."""

from __future__ import annotations

import pytest

from qlora_operator.objects import merge_diff, merge_patch

# RFC 7386 section 3's examples: (target, patch, result)
RFC_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_EXAMPLES)
def test_merge_patch_follows_rfc_7386(target, patch, result):
    assert merge_patch(target, patch) == result


def test_merge_patch_leaves_its_inputs_alone():
    target, patch = {"a": {"b": 1}}, {"a": {"c": 2}}
    merge_patch(target, patch)
    assert target == {"a": {"b": 1}} and patch == {"a": {"c": 2}}


def test_two_status_patches_sent_as_one_give_the_same_status():
    # a group restart: the failed run's status, then the next run's, sent once
    read = {"run": 1, "phase": "Running", "artifacts": {"run": 0, "adapterUri": "s3://o/run-0/adapter/"},
            "progress": {"step": 7}, "completionTime": "t0"}
    first = {"phase": "Pending", "completionTime": None, "artifacts": {"mergedUri": "s3://o/run-0/merged/"}}
    second = {"run": 2, "jobName": "bot-train-r2", "artifacts": {"adapterUri": None}}
    in_steps = merge_patch(merge_patch(read, first), second)
    once = merge_diff(read, in_steps)
    assert merge_patch(read, once) == in_steps
    assert once == {"run": 2, "jobName": "bot-train-r2", "phase": "Pending", "completionTime": None,
                    "artifacts": {"adapterUri": None, "mergedUri": "s3://o/run-0/merged/"}}
    assert merge_diff(read, read) == {}
