"""metrics.jsonl read and repaired (training/metrics_file.py): a line cut short is skipped with a
warning and removed before a resume appends; a complete last record without its newline counts."""

import json
import os

from jaxllm.training import metrics_file


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def _lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_readers_skip_a_partial_last_line_with_a_warning(tmp_path, capsys):
    path = _write(tmp_path / "metrics.jsonl", _lines({"step": 1}, {"step": 2}) + '{"step": 3, "lo')
    assert metrics_file.read_records(str(path)) == [{"step": 1}, {"step": 2}]
    assert "skipped line 3 (cut short)" in capsys.readouterr().err

    _write(path, _lines({"step": 1}) + "garbage\n" + '{"step": 3}')
    assert metrics_file.read_records(str(path)) == [{"step": 1}, {"step": 3}]
    err = capsys.readouterr().err
    assert "line 2 (not a JSON object)" in err and "line 3" not in err


def test_a_resume_drops_later_steps_and_partial_lines_in_one_rewrite(tmp_path, capsys):
    path = str(tmp_path / "metrics.jsonl")
    _write(path, _lines({"step": 1}, {"step": 2}, {"step": 3}) + '{"step": 4, "loss": 2.')
    metrics_file.keep_through(path, 2)
    with open(path) as f:
        assert f.read() == _lines({"step": 1}, {"step": 2})
    assert "removed line 4 (cut short)" in capsys.readouterr().err
    assert not os.path.exists(path + ".tmp")

    inode = os.stat(path).st_ino
    metrics_file.keep_through(path, 2)  # already valid: left alone
    assert os.stat(path).st_ino == inode and capsys.readouterr().err == ""

    _write(path, _lines({"step": 1}) + '{"step": 2}')  # complete, only its newline missing
    metrics_file.keep_through(path, 5)
    with open(path) as f:
        assert f.read() == _lines({"step": 1}, {"step": 2})
    metrics_file.keep_through(str(tmp_path / "absent.jsonl"), 0)  # a fresh run has none
