"""The three commands speak one language: every argument explained in plain text, one name per
flag, ``--version`` everywhere, and the recipes listed where ``fit`` asks for one.

The parsers are walked, not listed by hand, so an argument added later without help (or with
RST markup that ``--help`` would print literally) fails here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from vvireid.indexer import cli as index_cli
from vvireid.server import cli as serve_cli
from vvireid.training import cli as train_cli
from vvireid.training.config import available_configs

CLIS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable[[list[str]], int]]] = {
    "vvireid-train": (train_cli.build_parser, train_cli.main),
    "vvireid-index": (index_cli.build_parser, index_cli.main),
    "vvireid-serve": (serve_cli.build_parser, serve_cli.main),
}
# Names that meant something else in one of the commands, or the same thing under two names.
RETIRED_FLAGS = {"--num-workers", "--workers-threads", "--k"}


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every (command path, action) of a parser and of all its subcommands, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            described = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", argparse.Action([name], name, help=described.get(name))
                yield from walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def all_actions() -> list[tuple[str, argparse.Action]]:
    return [item for prog, (build, _) in CLIS.items() for item in walk(build(), prog)]


def label(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_every_argument_and_subcommand_has_plain_text_help() -> None:
    missing, markup = [], []
    for path, action in all_actions():
        text = action.help
        if not text or text == argparse.SUPPRESS or not str(text).strip():
            missing.append(f"{path}: {label(action)}")
        elif "``" in str(text) or ":func:" in str(text):
            markup.append(f"{path}: {label(action)}: {text}")
    assert not missing, "arguments without help:\n" + "\n".join(missing)
    assert not markup, "RST markup in help:\n" + "\n".join(markup)


def test_descriptions_are_plain_text() -> None:
    found = []
    for prog, (build, _) in CLIS.items():
        for path, parser in parsers(build(), prog):
            for text in (parser.description, parser.epilog, parser.format_help()):
                if text and ("``" in text or ":func:" in text or "::\n" in text):
                    found.append(f"{path}: {text[:200]!r}")
    assert not found, "RST markup in --help:\n" + "\n".join(found)


def test_one_name_per_flag_and_device_is_the_same_option_everywhere() -> None:
    actions = all_actions()
    retired = sorted({f"{path}: {o}" for path, a in actions for o in a.option_strings
                      if o in RETIRED_FLAGS})
    assert not retired, f"retired flag names still in use: {retired}"
    devices = [(path, a) for path, a in actions if "--device" in a.option_strings]
    assert {path.split()[0] for path, _ in devices} == set(CLIS)
    for path, action in devices:
        assert action.choices is None, f"{path}: --device has fixed choices {action.choices}"
        assert "cuda:N" in action.help or "cuda[:N]" in action.help, f"{path}: {action.help}"
    workers = {(path, a.dest) for path, a in actions if "--workers" in a.option_strings}
    assert workers and {dest for _, dest in workers} == {"workers"}, workers


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_version(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, main = CLIS[prog]
    try:
        status = main(["--version"])
    except SystemExit as exc:  # argparse's version action exits; vvireid-index returns instead
        status = exc.code
    assert status == 0
    assert capsys.readouterr().out.strip() == f"{prog} {importlib.metadata.version('vvireid')}"


def test_fit_help_lists_every_recipe() -> None:
    fit = dict(parsers(train_cli.build_parser(), "vvireid-train"))["vvireid-train fit"]
    text = fit.format_help()
    recipes = available_configs()
    assert recipes and all(name in text for name in recipes), (recipes, text)


def test_train_without_its_extra_names_the_extra_to_install() -> None:
    """The serving install has no PyYAML: ``vvireid-train`` says what to install, no traceback."""
    code = ("import sys; sys.modules['yaml'] = None\n"
            "from vvireid.training.cli import main\n"
            "sys.exit(main(['fit', '--help']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'vvireid[train]'" in done.stderr and "Traceback" not in done.stderr
