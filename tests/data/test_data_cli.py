"""`climber data` on the command line: output into a pipe its reader closed, field separators (by name,
refused, suggested), and the help of --columns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from climber.cli import main

HEADER = ("user", "item", "ts", "action")
ROWS = [(f"u{k % 2}", f"i{k}", str(1_511_604_000 + k), "5" if k % 3 else "1") for k in range(24)]


def write(path, separator: str):
    path.write_text("".join(separator.join(r) + "\n" for r in [HEADER, *ROWS]))
    return path


def prepare_argv(path, out, *extra: str) -> list[str]:
    return ["data", "prepare", str(path), "--label", "action>=4", "--out", str(out), *extra]


def test_output_into_a_pipe_closed_early_ends_quietly(tiny_synth):
    """`climber data info DIR --json | head -0`: no traceback, the exit status of a tool ended by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "climber", "data", "info", str(tiny_synth), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (the import alone takes longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""  # neither a traceback nor Python's "Exception ignored ... BrokenPipeError" at exit


@pytest.mark.parametrize("separator", ["tab", "TAB", "\\t", "\t", "\\x09"])
def test_tab_separator_by_name_or_escape(tmp_path, separator):
    assert main(prepare_argv(write(tmp_path / "log.tsv", "\t"), tmp_path / "p", "--separator", separator)) == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["rows"] == len(ROWS)


@pytest.mark.parametrize("separator", ["::", "", "§", "\\q"])
def test_an_invalid_separator_gets_one_line_naming_the_choices(tmp_path, capsys, separator):
    assert main(prepare_argv(write(tmp_path / "log.csv", ","), tmp_path / "p", "--separator", separator)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"climber: error: --separator {separator!r}: expected one character")
    assert err.count("\n") == 1 and "tab, comma, semicolon, pipe, space" in err


@pytest.mark.parametrize("separator, name, columns", [
    ("\t", "tab", None),
    ("\t", "tab", "user=user,item=item,ts=ts,action=action"),
    (";", "semicolon", None),
    ("|", "pipe", "user=user"),
])
def test_a_file_read_with_the_wrong_separator_suggests_the_right_one(tmp_path, capsys, separator, name, columns):
    path = write(tmp_path / "log.txt", separator)
    assert main(prepare_argv(path, tmp_path / "p", *(["--columns", columns] if columns else []))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f"; try --separator {name}\n")
    assert f"the header split on ',' gives {separator.join(HEADER)!r}, without 'user'" in err
    assert not (tmp_path / "p").exists()


def test_columns_help_names_every_role(capsys):
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    out = capsys.readouterr().out
    columns_help = " ".join(out[out.index("\n  --columns"):out.index("\n  --label")].split())
    for role in ("user, item, ts, action (required)", "scenario", "label (0/1", "item_NAME (categorical, one value per "
                 "item)", "user_NAME", "ctx_NAME", "num_NAME", "any other name"):
        assert role in columns_help
