"""Every command that README.md and documentation/*.md show in bash blocks runs as written.

The commands are read from the fenced bash blocks (continuation lines joined, comments, `$ ` prompts and leading
`VAR=value` assignments dropped, `$(moe_nnunet ...)` substitutions included). Nothing is run:

* `moe_nnunet SUBCOMMAND ...`: the subcommand is in the CLI registry and the real parser (`moe_nnunet.cli`) accepts
  the arguments as shown, with shell variables and `<placeholders>` replaced by dummy values. Where the docs elide
  arguments with `...`, the parser is asked only about what is shown (its required options relaxed);
* `nnUNetv2_*`: the console script is installed beside this Python, its entry point answers `--help` (called in this
  process, which is how all of them fit in a few seconds), and every flag shown is in that help;
* `bash scripts/NAME.sh`: the script exists.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "documentation").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell)[ \t]*\n(.*?)^```", re.S | re.M)
SEPARATORS = {";", "&&", "||", "|", "&"}


class Command:
    """One command shown in the docs: where, and its words after the shell's substitutions were replaced."""

    def __init__(self, where: str, words: list[str], elided: bool) -> None:
        self.where, self.words, self.elided = where, words, elided

    def __repr__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def _placeholder(match: re.Match) -> str:
    name = match.group(1) or match.group(2)
    return "0" if len(name) == 1 else f"/placeholder/{name}"  # a loop variable (fold) or a folder


def _words(text: str) -> list[list[str]]:
    """The simple commands of one shell line, each as its words (comments dropped, split at ; && || |)."""
    text = re.sub(r"<[^<>\n]*>", "PLACEHOLDER", text)                     # <from inference_information.json>
    if re.search(r"\[-", text):                                            # a synopsis: [--device cpu|cuda]
        text = re.sub(r"\[(?=-)", "", text)
        text = re.sub(r"(?<=[\w.])\](?=\s|$)", "", text)
        text = re.sub(r"(?<=\w)\|\w+", "", text)                            # cpu|cuda: the first alternative
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [c for c in commands + [current] if c]


def doc_commands() -> list[Command]:
    """Every `moe_nnunet`, `nnUNetv2_*` and `bash scripts/...` command in the docs' bash blocks."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start(2)) + 1
            lines = block.group(2).split("\n")
            joined, start = "", None
            for number, line in enumerate(lines, first_line):
                start = number if start is None else start
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                where = f"{doc.relative_to(ROOT)}:{start}"
                # $(moe_nnunet trainer_path) inside an export or an argument
                shown = [f"moe_nnunet {s}" for s in re.findall(r"\$\(moe_nnunet ([^)]*)\)", joined)]
                body = re.sub(r"\$\([^)]*\)", "/placeholder/substitution", joined.strip())
                body = re.sub(r"^\$ ", "", body)
                for words in [w for text_ in shown for w in _words(text_)] + _words(body):
                    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):  # VAR=value command
                        words = words[1:]
                    if words and (words[0] == "moe_nnunet" or words[0].startswith("nnUNetv2_")
                                  or (words[0] == "bash" and words[1:2] and words[1].startswith("scripts/"))):
                        elided = "..." in words
                        words = [re.sub(r"\$\{?(\w+)\}?|\$(\w+)", _placeholder, w) for w in words if w != "..."]
                        found.append(Command(where, words, elided))
                joined, start = "", None
    return found


COMMANDS = doc_commands()
OURS = [c for c in COMMANDS if c.words[0] == "moe_nnunet"]
NNUNET = sorted({c.words[0] for c in COMMANDS if c.words[0].startswith("nnUNetv2_")})
SCRIPTS = [c for c in COMMANDS if c.words[0] == "bash"]


def test_the_docs_show_commands():
    """The reading above finds what the docs hold (a changed fence or layout would otherwise test nothing)."""
    assert len(OURS) >= 30 and len(NNUNET) >= 8 and SCRIPTS, (len(OURS), NNUNET, SCRIPTS)
    shown = {c.words[1] for c in OURS}
    assert {"plan", "cv", "predict", "merge", "bench", "trainer_path"} <= shown, shown
    assert {"nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_plan_and_preprocess"} <= set(NNUNET)


class _Refused(Exception):
    pass


def _refuse(self: argparse.ArgumentParser, message: str):
    raise _Refused(f"{self.prog}: {message}")


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The deepest subparser the words name (e.g. `datasets build`)."""
    while parser._subparsers is not None:
        choices = parser._subparsers._group_actions[0].choices
        name = next((w for w in words if w in choices), None)
        if name is None:
            break
        parser = choices[name]
    return parser


@pytest.mark.parametrize("command", OURS, ids=[f"{c.where} {' '.join(c.words[1:2])}" for c in OURS])
def test_moe_nnunet_command_is_accepted_as_shown(command, monkeypatch):
    from moe_nnunet.cli import COMMANDS as REGISTRY, build_parser

    args = command.words[1:]
    assert args and args[0] in REGISTRY, f"{command}: no subcommand {args[:1]} in moe_nnunet.cli.COMMANDS"
    parser = build_parser()
    monkeypatch.setattr(argparse.ArgumentParser, "error", _refuse)
    if command.elided:  # `moe_nnunet cv ... --launcher slurm`: only what is shown must be right
        for action in _subparser(parser, args)._actions:
            monkeypatch.setattr(action, "required", False)
    try:
        parsed = parser.parse_args(args)
    except _Refused as e:
        pytest.fail(f"{command}\n  is refused by moe_nnunet's parser: {e}")
    assert callable(getattr(parsed, "func", None)), command


@lru_cache(maxsize=None)
def _help(script: str) -> str:
    """`SCRIPT --help`, from its console-script entry point called in this process."""
    import contextlib
    import io

    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            entry.load()()
    finally:
        sys.argv = argv
    assert exited.value.code in (0, None), f"{script} --help exited {exited.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("script", NNUNET)
def test_nnunet_command_exists_and_takes_the_flags_shown(script):
    assert (Path(sys.executable).parent / script).is_file(), f"{script} is not installed beside {sys.executable}"
    text = _help(script)
    assert "usage:" in text, text[:500]
    for command in (c for c in COMMANDS if c.words[0] == script):
        for flag in (w.split("=", 1)[0] for w in command.words[1:] if re.match(r"^--?[A-Za-z]", w)):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"{command}\n  {flag} is not an option of {script} (see {script} --help)"


@pytest.mark.parametrize("command", SCRIPTS, ids=[c.where for c in SCRIPTS])
def test_script_shown_exists(command):
    assert len(command.words) > 1 and (ROOT / command.words[1]).is_file(), command
