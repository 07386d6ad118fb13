"""serving/guard.py's checks on an inference body (no server: the fuzz suite sends these through `serve`)."""

import json

import pytest

from ctr_ensemble.serving.guard import INFER_PATH, check_infer_body


def _body(shape, **extra):
    return json.dumps({"inputs": [{"name": "cat_ids", "shape": shape, "datatype": "INT64", "data": [0] * 4, **extra}]}).encode()


def test_a_well_formed_body_passes():
    assert check_infer_body(_body([2, 2]), None, 1 << 20) is None
    assert check_infer_body(_body([0, 26]), None, 1 << 20) is None  # the empty batch is Triton's to answer


@pytest.mark.parametrize("shape, needle", [
    ([1000000000, 26], "declares shape [1000000000, 26] (26000000000 elements)"),
    ([-1, 26], "expected a list of non-negative integers"),
    ([1.5, 26], "expected a list of non-negative integers"),
    ([True, 26], "expected a list of non-negative integers"),
    ("26", "expected a list of non-negative integers"),
])
def test_impossible_shapes_are_refused_naming_the_input(shape, needle):
    status, msg = check_infer_body(_body(shape), None, 1 << 20)
    assert status == 400 and "'cat_ids'" in msg and needle in msg, msg


@pytest.mark.parametrize("body, header, needle", [
    (b"\xff\xfe garbage", None, "does not parse"),
    (b"[]", None, 'no "inputs" list'),
    (b'{"inputs": 5}', None, 'no "inputs" list'),
    (b'{"inputs": []}' + b"\0" * 8, "abc", "expected an integer between 0 and"),
    (b'{"inputs": []}', "99", "expected an integer between 0 and"),
])
def test_malformed_headers_are_refused(body, header, needle):
    status, msg = check_infer_body(body, header, 1 << 20)
    assert status == 400 and needle in msg, msg


def test_the_binary_extension_header_is_read_from_its_declared_length():
    head = _body([2, 2])
    assert check_infer_body(head + b"\0" * 32, str(len(head)), 1 << 20) is None
    huge = _body([10**9, 26])
    assert check_infer_body(huge + b"\0" * 32, str(len(huge)), 1 << 20)[0] == 400


def test_the_size_limit_gives_413():
    status, msg = check_infer_body(_body([2, 2]), None, 10)
    assert status == 413 and "exceeds the limit of 10 bytes" in msg


@pytest.mark.parametrize("path, matched", [("/v2/models/deepfm/infer", True), ("/v2/models/m/versions/3/infer", True),
                                           ("/v2/models/deepfm/ready", False), ("/v2/repository/index", False)])
def test_only_inference_paths_are_checked(path, matched):
    assert bool(INFER_PATH.match(path)) is matched
