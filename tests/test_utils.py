"""Tests of jaxmetric.utils: argument checks, atomic files, optional imports, flatten."""

import numpy as np
import pytest

from jaxmetric import utils


def test_check_positive_int():
    assert utils.check_positive_int("n", 3) == 3
    assert type(utils.check_positive_int("n", np.int64(3))) is int
    assert utils.check_positive_int("n", None, allow_none=True) is None
    for bad in (0, -1, 2.5, True, np.bool_(True), "3", None):
        with pytest.raises(ValueError, match="n must be a positive integer; got"):
            utils.check_positive_int("n", bad)
    with pytest.raises(ValueError, match="n must be a positive integer or None; got 0"):
        utils.check_positive_int("n", 0, allow_none=True)


def test_check_choice():
    utils.check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match="unknown mode 'c'; expected one of a, b"):
        utils.check_choice("mode", "c", ("a", "b"))


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "f.json"
    utils.write_atomic(path, "old\n")
    utils.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    utils.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_writer_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with utils.atomic_writer(path) as f:
            f.write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with utils.atomic_writer(path, "a"):
            pass


def test_require_names_the_install_command():
    assert utils.require("json", "reading").dumps([]) == "[]"
    with pytest.raises(ImportError, match="plotting needs no_such_module; install it with "
                                          "`pip install jaxmetric\\[eval\\]`"):
        utils.require("no_such_module", "plotting")


def test_flatten():
    assert utils.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}, "/") == {
        "a/b": 1, "a/c/d": 2, "e": 3}
