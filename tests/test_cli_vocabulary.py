"""One flag vocabulary across the entry points: canonical names, old spellings as aliases, help
that names each default once, and the console scripts pyproject declares."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
MODULES = {
    "marsseg-search": "search.run",
    "marsseg-export": "search.export",
    "marsseg-final": "search.final",
    "marsseg-compare": "search.compare",
    "marsseg-predict": "search.predict",
    "marsseg-train": "marsseg.train.__main__",
    "marsseg-data": "marsseg.data.__main__",
    "marsseg-models": "marsseg.models.__main__",
}
OLD_TO_CANONICAL = {
    "--epochs": "--max-epochs",
    "--threads": "--cpus-per-trial",
    "--final-epochs": "--final-max-epochs",
}
# `marsseg.models` profiles latency with N torch threads: no training run, no CPUs per trial.
PLAIN_THREADS = {"marsseg.models.__main__"}


def parsers(module: str) -> list[argparse.ArgumentParser]:
    """The entry point's parser and its subcommands' parsers."""
    found = [importlib.import_module(module).build_parser()]
    for parser in found:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
    return found


def test_every_entry_point_is_a_console_script():
    assert {name: f"{module}:cli" for name, module in MODULES.items()} == SCRIPTS


@pytest.mark.parametrize("script", sorted(MODULES))
def test_console_script_shows_its_own_name(script, monkeypatch, capsys):
    module, function = SCRIPTS[script].split(":")
    cli = getattr(importlib.import_module(module), function)
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / script), "--help"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script} ")


def test_installed_console_script_runs():
    script = Path(sys.executable).parent / "marsseg-search"
    if not script.exists():
        pytest.skip("the project is not installed into this interpreter's environment")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: marsseg-search ")


@pytest.mark.parametrize("module", sorted(MODULES.values()))
def test_help_names_each_default_once(module):
    for parser in parsers(module):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help in (None, argparse.SUPPRESS):
                continue
            text = formatter._expand_help(action)
            where = f"{module} {'/'.join(action.option_strings) or action.dest}: {text!r}"
            assert text.count("(default") <= 1, where
            assert "(default: None)" not in text, where
            assert "SUPPRESS" not in text, where


@pytest.mark.parametrize("module", sorted(MODULES.values()))
def test_old_spellings_are_aliases_of_the_canonical_flag(module):
    for parser in parsers(module):
        for action in parser._actions:
            for old, canonical in OLD_TO_CANONICAL.items():
                if old not in action.option_strings:
                    continue
                if old == "--threads" and module in PLAIN_THREADS:
                    continue
                assert action.option_strings[0] == canonical, (module, action.option_strings)


@pytest.mark.parametrize(
    ("module", "old", "canonical"),
    [
        (
            "marsseg.train.__main__",
            ["--preset", "plain", "--epochs", "3", "--threads", "2"],
            ["--preset", "plain", "--max-epochs", "3", "--cpus-per-trial", "2"],
        ),
        (
            "search.final",
            ["--config", "c.yaml", "--epochs", "3", "--threads", "2"],
            ["--config", "c.yaml", "--max-epochs", "3", "--cpus-per-trial", "2"],
        ),
        (
            "search.compare",
            ["--candidate", "a=preset:plain", "--epochs", "3"],
            ["--candidate", "a=preset:plain", "--max-epochs", "3"],
        ),
        (
            "search.run",
            ["--config", "s.yaml", "--final-epochs", "4"],
            ["--settings", "s.yaml", "--final-max-epochs", "4"],
        ),
    ],
)
def test_old_spellings_parse_as_the_canonical_ones(module, old, canonical):
    parser = importlib.import_module(module).build_parser()
    assert vars(parser.parse_args(old)) == vars(parser.parse_args(canonical))


def test_settings_file_takes_old_key_names(tmp_path):
    from search.run import parse_args

    settings = tmp_path / "search.yaml"
    settings.write_text("final_epochs: 4\nnum_samples: 2\n")
    args, given = parse_args(["--settings", str(settings)])
    assert args.final_max_epochs == 4
    assert given["final_max_epochs"] == 4
