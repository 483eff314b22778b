"""The exception family: every project error is an Rp2kError with a hint and a retry flag;
the CLI prints those as one line plus the hint and lets every other exception (a bug)
keep its traceback; the retry policy of a run reads ``retryable``."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from rp2k_dist import cli, errors
from rp2k_dist.cli import data as cli_data
from rp2k_dist.errors import (
    ConfigError, NotFoundError, PreflightError, Rp2kError, StorageError, TROUBLESHOOTING, is_retryable,
)
from rp2k_dist.launch.preflight import first_not_retryable

PACKAGE = Path(errors.__file__).resolve().parent


def family() -> list[type[Rp2kError]]:
    """Every class of the family (imported modules only: errors.py defines them all)."""
    found, todo = [], [Rp2kError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_exception_class_of_the_package_is_in_the_family():
    """No module defines an exception on a built-in base: a class whose bases end in Error
    or Exception is defined in errors.py (or derives from a class that is)."""
    names = {cls.__name__ for cls in family()}
    outside = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef) or node.name == Rp2kError.__name__:
                continue
            bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
            if any(b.endswith(("Error", "Exception")) for b in bases) and not any(b in names for b in bases):
                outside.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}({', '.join(bases)})")
    assert not outside, "exceptions outside the Rp2kError family:\n" + "\n".join(outside)


def test_each_class_has_its_own_hint_pointing_at_the_troubleshooting_page():
    for cls in (c for c in family() if c.__module__ == errors.__name__):
        assert TROUBLESHOOTING in cls.hint, cls
        if cls is not Rp2kError and cls is not errors.CorruptImageError:  # counted skips, never shown alone
            assert f"#{cls.__name__.lower()}" in cls.hint, f"{cls.__name__}.hint should name its section"


def test_retryable_says_whether_a_restart_can_help():
    assert not is_retryable(ConfigError("optim.lr must be > 0"))
    assert not is_retryable(errors.CorruptDataError("too many corrupt samples"))
    assert is_retryable(StorageError("cannot write s3://b/x: connection reset"))
    assert not is_retryable(NotFoundError("s3://b/x does not exist"))  # gone stays gone
    assert is_retryable(RuntimeError("a worker died"))  # not ours: Ray's restart policy decides
    assert not is_retryable(StorageError("bucket missing", retryable=False))  # per instance


def test_the_retry_policy_reads_retryable():
    died, config = RuntimeError("worker died"), ConfigError("data.shards: no manifest")
    assert first_not_retryable({0: died, 1: StorageError("timeout")}) is None
    assert first_not_retryable({3: config, 1: died}) is config
    assert first_not_retryable({2: ConfigError("b"), 1: config}) is config  # the lowest rank's


def test_errors_survive_pickling_with_their_hint_and_flags():
    """Ray sends a worker's exception to the driver pickled."""
    err = pickle.loads(pickle.dumps(StorageError("cannot read s3://b/k", hint="check AWS_ENDPOINT_URL", retryable=False)))
    assert (type(err), str(err), err.hint, err.retryable) == (StorageError, "cannot read s3://b/k",
                                                              "check AWS_ENDPOINT_URL", False)
    pre = pickle.loads(pickle.dumps(PreflightError(["data.shards: missing", "run.workers: too many"])))
    assert pre.problems == ["data.shards: missing", "run.workers: too many"]
    assert str(pre) == "data.shards: missing\nrun.workers: too many"
    missing = pickle.loads(pickle.dumps(NotFoundError("gone")))
    assert isinstance(missing, FileNotFoundError) and isinstance(missing, Rp2kError)


def _command_raising(monkeypatch, error: BaseException):
    def boom(args):
        raise error
    monkeypatch.setattr(cli_data, "cmd_verify", boom)


def test_the_cli_prints_an_rp2k_error_as_one_line_and_its_hint(monkeypatch, capsys):
    _command_raising(monkeypatch, ConfigError("optim.lr must be a positive number", hint="set optim.lr=0.1"))
    assert cli.main(["verify", "shards/x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["rp2k verify: error: optim.lr must be a positive number", "  hint: set optim.lr=0.1"]


def test_the_cli_keeps_several_lines_of_one_error_indented(monkeypatch, capsys):
    _command_raising(monkeypatch, PreflightError(["data.shards: missing", "run.workers: too many"]))
    assert cli.main(["verify", "shards/x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["rp2k verify: error: data.shards: missing", "  run.workers: too many"]
    assert err[2] == f"  hint: {PreflightError.hint}"


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An IndexError (or a RuntimeError from a worker) is not dressed up as a user error."""
    _command_raising(monkeypatch, IndexError("list index out of range"))
    with pytest.raises(IndexError):
        cli.main(["verify", "shards/x"])
    _command_raising(monkeypatch, RuntimeError("worker crashed"))
    with pytest.raises(RuntimeError):
        cli.main(["verify", "shards/x"])


def test_traceback_flag_raises_an_rp2k_error_too(monkeypatch):
    _command_raising(monkeypatch, ConfigError("bad"))
    with pytest.raises(ConfigError):
        cli.main(["--traceback", "verify", "shards/x"])


def test_a_missing_shards_folder_is_one_line_end_to_end(tmp_path, capsys):
    """Through the real command: no stub."""
    assert cli.main(["verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("rp2k verify: error: ") and "nowhere" in err[0] and "rp2k pack" in err[0]
    assert err[1].startswith("  hint: ")
