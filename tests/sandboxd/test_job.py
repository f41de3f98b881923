"""Checking an execute request at the edge: the job, its limits, and each refusal."""

from __future__ import annotations

import base64

import pytest

from sandboxd.errors import InvalidParams, LimitAboveMaximum, UnsupportedLanguage
from sandboxd.job import parse_job
from sandboxd.languages import LanguageTable
from sandboxd.limits import LimitBounds, default_bounds

LANGUAGES = LanguageTable({"python": "3.11.2", "rust": "1.85.0"})
BOUNDS = default_bounds()


def job(**params):
    return parse_job({"language": "python", "code": "print(1)", **params}, LANGUAGES, BOUNDS)


def test_defaults():
    parsed = job()
    assert parsed.language.name == "python"
    assert parsed.limits.wall_time == 30
    assert parsed.agent_message()["run"]["argv"] == ["python3", "main.py"]


@pytest.mark.parametrize("alias", ["py", "python3", "Python", " python "])
def test_aliases(alias):
    assert job(language=alias).language.name == "python"


def test_unknown_and_unoffered_languages():
    known = r"Unsupported language: go \(known: python, rust"
    with pytest.raises(UnsupportedLanguage, match=known):
        job(language="go")
    with pytest.raises(UnsupportedLanguage):  # a language the image was not built with
        job(language="typescript")


def test_timeout_is_the_wall_time_and_nonpositive_means_default():
    assert job(timeout=5).limits.wall_time == 5
    assert job(timeout=0).limits.wall_time == 30
    assert job(timeout=-1).limits.wall_time == 30
    with pytest.raises(InvalidParams, match=r"either timeout or limits\.wall_time"):
        job(timeout=5, limits={"wall_time": 5})


def test_limits_within_and_above_the_maximum():
    bounds = {**BOUNDS, "memory_bytes": LimitBounds(2**26, 2**27)}
    parsed = parse_job(
        {"language": "py", "code": "", "limits": {"memory_bytes": 2**27}}, LANGUAGES, bounds
    )
    assert parsed.limits.memory_bytes == 2**27
    with pytest.raises(LimitAboveMaximum) as caught:
        parse_job(
            {"language": "py", "code": "", "limits": {"memory_bytes": 2**27 + 1}}, LANGUAGES, bounds
        )
    assert "limits.memory_bytes" in caught.value.message
    assert caught.value.data["maximum"] == 2**27


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"processes": 1.5}, "limits.processes"),
        ({"processes": True}, "limits.processes"),
        ({"wall_time": 0}, "limits.wall_time"),
        ({"nice": 1}, "limits.nice"),
        ([], "limits"),
    ],
)
def test_malformed_limits(limits, field):
    with pytest.raises(InvalidParams) as caught:
        job(limits=limits)
    assert caught.value.data["field"] == field


def test_files_are_sent_base64_in_the_agent_message():
    parsed = job(
        files=[
            {
                "path": "a/b.bin",
                "content": base64.b64encode(b"\0\1").decode(),
                "encoding": "base64",
            },
            {"path": "t.txt", "content": "héllo"},
        ]
    )
    files = parsed.agent_message()["files"]
    assert files[0] == {"path": "main.py", "content": "print(1)", "encoding": "utf-8"}
    assert base64.b64decode(files[1]["content"]) == b"\0\1"
    assert base64.b64decode(files[2]["content"]) == "héllo".encode()


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "a/../../b",
        "a//b",
        "./a",
        "",
        "a/.",
        "x\0y",
        "main.py",
        "main.py/inner",
        "d" * 300,
    ],
)
def test_file_paths_that_could_leave_the_workdir_or_clash_are_refused(path):
    with pytest.raises(InvalidParams) as caught:
        job(files=[{"path": path, "content": ""}])
    assert caught.value.data["field"] == "files[0].path"


def test_a_file_may_not_be_both_file_and_directory():
    with pytest.raises(InvalidParams, match="clashes"):
        job(files=[{"path": "a", "content": ""}, {"path": "a/b", "content": ""}])
    with pytest.raises(InvalidParams, match="clashes"):
        job(files=[{"path": "a/b", "content": ""}, {"path": "a", "content": ""}])


def test_rust_compiles_then_runs_with_args():
    parsed = job(language="rs", args=["x"])
    message = parsed.agent_message()
    assert message["compile"]["argv"][0] == "rustc"
    assert message["run"]["argv"] == ["./main", "x"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"code": "print('\ud800')"}, "code"),
        ({"stdin": "\udfff"}, "stdin"),
        ({"args": ["ok", "\ud9e1"]}, "args[1]"),
        ({"files": [{"path": "x\udc00", "content": ""}]}, "files[0].path"),
        ({"files": [{"path": "x", "content": "\udc00"}]}, "files[0].content"),
    ],
)
def test_strings_must_be_valid_unicode(params, field):
    # JSON can carry lone surrogates; no program can be given them.
    with pytest.raises(InvalidParams) as caught:
        job(**params)
    assert caught.value.data == {
        "field": field,
        "reason": "is not valid Unicode (a lone surrogate)",
    }


def test_memory_has_a_minimum_the_agent_fits_in():
    with pytest.raises(InvalidParams, match="at least 33554432 bytes"):
        job(limits={"memory_bytes": 2471})


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"timeout": float("nan")}, "timeout"),
        ({"limits": {"wall_time": float("inf")}}, "limits.wall_time"),
        ({"limits": {"cpu_time": float("nan")}}, "limits.cpu_time"),
    ],
)
def test_limits_must_be_finite_numbers(params, field):
    with pytest.raises(InvalidParams) as caught:
        job(**params)
    assert caught.value.data["field"] == field
