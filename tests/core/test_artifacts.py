"""Output staging (edgeprune.core.artifacts.staged_output): nothing of the user's is ever removed, nothing
half-written is left behind, and manifests' SHA-256s are checked (issue 13, items 1-4, 19, 25)."""

import errno
import json
import os
import signal
import tempfile

import pytest

from edgeprune import cli
from edgeprune.core.artifacts import check_integrity, check_output_dir, staged_output, verify_files, write_manifest
from edgeprune.core.errors import EdgePruneError


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def make_output(directory, files=None):
    directory.mkdir(parents=True)
    for name, text in (files or {"a.txt": "result"}).items():
        (directory / name).write_text(text)
    write_manifest(directory, "test", {})
    return directory


def test_directory_appearing_during_the_run_is_never_removed(tmp_path):
    """Item 1: the destination is re-checked at rename time; what appeared meanwhile is left alone."""
    out = tmp_path / "r"
    with pytest.raises(EdgePruneError, match="appeared while this run was working"):
        with staged_output(out) as tmp:
            (tmp / "model.onnx").write_text("done")
            out.mkdir()
            (out / "user.txt").write_text("keep")
    assert (out / "user.txt").read_text() == "keep"
    assert names(tmp_path) == ["r"]  # no staging directory left


def test_overwrite_only_replaces_edgeprune_outputs(tmp_path):
    """Item 2: a folder of the user's files is refused even with --overwrite; an edgeprune output or an
    empty directory is replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(EdgePruneError, match="not an edgeprune output"):
        check_output_dir(mine, overwrite=True)
    assert (mine / "thesis.tex").is_file()
    previous = make_output(tmp_path / "previous")
    with staged_output(previous, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert names(previous) == ["b.txt"]
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=True)
    # and an edgeprune output that the user filled with their files meanwhile is not replaced either
    out = make_output(tmp_path / "out")
    with pytest.raises(EdgePruneError, match="not an edgeprune output"):
        with staged_output(out, overwrite=True) as tmp:
            (out / "manifest.json").unlink()
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").is_file()
    assert names(tmp_path) == ["empty", "mine", "out", "previous"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """Item 3: SIGTERM during a run removes the staging directory and scratch under $TMPDIR, exits 143,
    and the previous SIGTERM handler is restored afterwards."""
    scratch_root = tmp_path / "tmpdir"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    out = tmp_path / "o" / "r"

    def work(args):
        with staged_output(out) as tmp, tempfile.TemporaryDirectory(prefix="edgeprune-export-") as scratch:
            (tmp / "model.onnx").write_bytes(b"partial")
            with open(os.path.join(scratch, "fp32.onnx"), "wb") as handle:
                handle.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler raises at the next bytecode
                pass
        raise AssertionError("SIGTERM did not interrupt the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_verify_command", work)
    assert cli.main(["verify", "x"]) == 143
    assert "terminated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and names(scratch_root) == []  # the parent it created, too
    assert signal.getsignal(signal.SIGTERM) is before


def test_failed_final_rename_removes_staging_and_keeps_previous(tmp_path, monkeypatch):
    """Item 4: a rename that fails ends in one error line; the staging directory is gone and the previous
    output is back in place."""
    out = make_output(tmp_path / "out", {"old.txt": "old"})
    real_replace = os.replace

    def failing(src, dst):
        if str(src).startswith(str(tmp_path / ".out.tmp-")):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(EdgePruneError, match="cannot move the finished output into place"):
        with staged_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert names(tmp_path) == ["out"]


def test_bad_output_paths_are_refused_up_front(tmp_path, monkeypatch):
    """Items 4, 19, 22: dangling symlink, the current directory, a file as a parent, an unwritable place."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(EdgePruneError, match="dangling symlink"):
        check_output_dir(link, overwrite=True)
    here = make_output(tmp_path / "here")
    monkeypatch.chdir(here)
    with pytest.raises(EdgePruneError, match="current directory"):
        check_output_dir(".", overwrite=True)
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(EdgePruneError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "afile.txt" / "sub", overwrite=False)
    with pytest.raises(EdgePruneError, match="cannot write output /proc/foo"):
        check_output_dir("/proc/foo", overwrite=False)
    assert names(here) == ["a.txt", "manifest.json"]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_is_one_line_naming_the_output(tmp_path, code, words):
    """Item 19: a write failure inside the run names the user's output, not a hidden temp path."""
    out = tmp_path / "out"
    with pytest.raises(EdgePruneError, match=words) as info:
        with staged_output(out) as tmp:
            raise OSError(code, os.strerror(code), str(tmp / "model.onnx"))
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert names(tmp_path) == []


def test_verify_detects_tampering(tmp_path, capsys):
    """Item 25: `edgeprune verify DIR` checks every file's SHA-256; loading checks them too."""
    out = make_output(tmp_path / "out", {"model.safetensors": "weights", "config.json": "{}"})
    assert verify_files(out) == []
    assert cli.main(["verify", str(out)]) == 0
    assert "all 2 files match" in capsys.readouterr().out
    (out / "model.safetensors").write_text("tampered")
    (out / "config.json").unlink()
    problems = verify_files(out)
    assert len(problems) == 2 and any("config.json: missing" in p for p in problems)
    assert cli.main(["verify", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
    assert captured.err.strip().count("\n") == 0 and "2 of 2 files" in captured.err
    with pytest.raises(EdgePruneError, match="config.json: missing .*and 1 more"):
        check_integrity(out)
