"""The test suite leaves the repository as it found it: conftest's session check (`repository_untouched`) compares
snapshots of the repository before and after the session; here, that the comparison sees every kind of write."""

import os

from repository import NOT_LOOKED_AT, ROOT, changes, snapshot


def test_snapshots_show_files_created_changed_and_removed(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "changed.txt").write_text("a")
    (tmp_path / "removed.txt").write_text("a")
    (tmp_path / "__pycache__").mkdir()
    before = snapshot(tmp_path)
    (tmp_path / "changed.txt").write_text("bb")
    (tmp_path / "removed.txt").unlink()
    (tmp_path / "runs" / "examples" / "base").mkdir(parents=True)
    (tmp_path / "runs" / "examples" / "base" / "config.json").write_text("{}")
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"")  # Python's own cache is not a test's doing
    assert changes(before, snapshot(tmp_path)) == ["~ changed.txt", "- removed.txt", "+ runs/examples/base/config.json"]


def test_the_session_check_looks_at_the_whole_repository():
    seen = snapshot()
    assert "pyproject.toml" in seen and "tests/conftest.py" in seen and "hf_fwdattr/__init__.py" in seen
    assert not any(part in NOT_LOOKED_AT for path in seen for part in path.split(os.sep))
    assert ROOT.joinpath("tests", "repository.py").is_file()
