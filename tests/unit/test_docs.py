"""README.md and docs/ stay true to the repository: every relative link resolves and every
``ingest ...`` command they show exists in the CLI, with the options shown (pure: files and
argparse only)."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingest.cli import _parser
from ingest.tools import bench

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^\n]*)$")
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
# A link or image: [text](target) or [text](target "title"); text may span lines.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


@dataclass(frozen=True)
class Text:
    """A markdown file split into prose and fenced blocks."""

    prose: str
    blocks: list[tuple[str, str]]  # (info string, body)


def split(markdown: str) -> Text:
    """Prose (fenced blocks blanked, so line numbers stay) and the fenced blocks."""
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    info = ""
    body: list[str] = []
    for line in markdown.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence, info, body = m["fence"], m["info"].strip().split(" ")[0].lower(), []
            prose.append("")
        elif fence is not None and re.fullmatch(rf" {{0,3}}{fence[0]}{{{len(fence)},}}\s*", line):
            blocks.append((info, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    return Text("\n".join(prose), blocks)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation removed, lowercase, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in split(markdown).prose.splitlines():
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m[2])
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(markdown: str) -> list[str]:
    """The targets of the links in the prose (not in code)."""
    prose = INLINE_CODE.sub(lambda m: " " * len(m[0]), split(markdown).prose)
    return [m[1] for m in LINK.finditer(prose)]


def broken_links(path: Path, markdown: str, root: Path = ROOT) -> list[str]:
    """Relative links of ``path`` whose file, or heading in a markdown file, is missing."""
    broken = []
    for target in links(markdown):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists() or not dest.is_relative_to(root):
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    return broken


def commands(markdown: str) -> list[str]:
    """Every ``ingest ...`` command shown: inline code, and lines of shell (or bare) fenced
    blocks, a line ending inside brackets or on ``|`` or ``\\`` continued by the next;
    ``python -m ingest`` and ``make bench BENCH_ARGS=...`` count as ``ingest``."""
    text = split(markdown)
    found = [
        m[2].strip()
        for m in INLINE_CODE.finditer(text.prose)
        if re.match(r"(python -m )?ingest\s", m[2].strip())
    ]
    for info, body in text.blocks:
        if info not in SHELL_BLOCKS:
            continue
        pending = ""
        for raw in body.splitlines():
            line = f"{pending} {raw.strip()}" if pending else raw.strip().removeprefix("$ ")
            code = line.split(" #")[0].rstrip()
            depth = sum(code.count(c) for c in "[(") - sum(code.count(c) for c in ")]")
            if depth > 0 or code.endswith(("|", "\\")):
                pending = code.removesuffix("\\")
                continue
            pending = ""
            found.append(line)
    out = []
    for c in found:
        c = re.sub(r'^make bench BENCH_ARGS="([^"]*)".*', r"ingest bench \1", c)
        c = c.removeprefix("python -m ")
        if c.startswith("ingest ") or c == "ingest":
            out.append(c)
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for action in p._actions for s in action.option_strings}


def _placeholder(word: str) -> bool:
    """NAME, <topic>, ``...``: stands for a value the reader fills in."""
    return word == "..." or word.startswith("<") or (word.isupper() and word.isalpha())


def _tokens(command: str) -> list[str]:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote: split on spaces
        words = command.split()
    out = []
    for w in words:
        w = w.strip("[](),")
        if w == "|" or w:
            out.append(w.split("=", 1)[0] if w.startswith("-") else w)
    return out


def cli_problems(command: str, root: argparse.ArgumentParser | None = None) -> list[str]:
    """What in ``command`` the CLI does not have: an unknown subcommand, or an option the
    (sub)command it follows does not take. ``a | b`` after a subcommand is read as a
    synopsis of alternatives (``migrate up ... | down ...``)."""
    chain = [root or _parser()]
    names = ["ingest"]
    alternative = False
    problems: list[str] = []
    for word in _tokens(command)[1:]:
        if word == "|":
            alternative = True
            continue
        if word.startswith("-"):
            alternative = False
            if word not in _options(chain[-1]):
                problems.append(f"{' '.join(names)} has no option {word}")
            continue
        if alternative and len(chain) > 1:
            chain.pop()
            names.pop()
        alternative = False
        choices = _subparsers(chain[-1])
        if not choices:
            continue  # a value
        if _placeholder(word):
            names.append(word)  # the rest is for some subcommand: nothing more to check
            break
        if word not in choices:
            problems.append(f"{' '.join(names)} has no subcommand {word}")
            break
        chain.append(bench.parser() if names == ["ingest"] and word == "bench" else choices[word])
        names.append(word)
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_to_a_file_and_heading(path: Path) -> None:
    assert broken_links(path, path.read_text()) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_ingest_command_shown_exists_with_the_options_shown(path: Path) -> None:
    problems = {c: cli_problems(c) for c in commands(path.read_text())}
    assert {c: p for c, p in problems.items() if p} == {}


def test_the_readme_shows_every_ingest_subcommand() -> None:
    shown = {c.split()[1] for c in commands((ROOT / "README.md").read_text()) if " " in c}
    assert set(_subparsers(_parser())) <= shown


# The checks themselves: each must catch what it is for.


def test_a_link_to_a_missing_file_is_broken(tmp_path: Path) -> None:
    doc = tmp_path / "a.md"
    assert broken_links(doc, "see [b](b.md) and [c](https://example.com/c)", tmp_path) == [
        "b.md: no such file"
    ]


def test_a_link_to_a_missing_heading_is_broken_and_githubs_anchors_resolve(
    tmp_path: Path,
) -> None:
    (tmp_path / "b.md").write_text(
        "# B\n\n## Positions: show, reset, a recreated topic\n\n## Query files (`q/`)\n\n## B\n"
    )
    doc = tmp_path / "a.md"
    text = (
        "[1](b.md#positions-show-reset-a-recreated-topic) [2](b.md#query-files-q)"
        " [3](b.md#b-1) [4](b.md#no-such-heading)\n\n# Here\n[5](#here) [6](#there)"
    )
    doc.write_text(text)
    assert broken_links(doc, text, tmp_path) == [
        "b.md#no-such-heading: no heading with that anchor in b.md",
        "#there: no heading with that anchor in a.md",
    ]


def test_links_in_code_are_not_links_and_link_text_may_span_lines() -> None:
    text = "`[x](nowhere.md)`\n\n```sh\n[y](nowhere.md)\n```\n[two\nlines](there.md)"
    assert links(text) == ["there.md"]


def test_commands_come_from_inline_code_and_shell_blocks_only() -> None:
    text = (
        "Run `ingest report` or `python -m ingest schema`; `ingest_ready` is a metric.\n"
        '```sh\ningest run            # the worker\nmake bench BENCH_ARGS="--events 10"\n```\n'
        '```json\n{"run": "ingest nothing"}\n```\n'
        "```\ningest positions reset --topic T (--to-earliest |\n   --to-latest)\n```\n"
    )
    assert commands(text) == [
        "ingest report",
        "ingest schema",
        "ingest run            # the worker",
        "ingest bench --events 10",
        "ingest positions reset --topic T (--to-earliest | --to-latest)",
    ]


def test_a_made_up_subcommand_is_reported() -> None:
    assert cli_problems("ingest positions rewind --topic t") == [
        "ingest positions has no subcommand rewind"
    ]


def test_a_made_up_option_is_reported_for_the_subcommand_it_follows() -> None:
    assert cli_problems("ingest dlq replay --reason unknown_call --all") == [
        "ingest dlq replay has no option --all"
    ]
    assert cli_problems("ingest bench --events 10 --history-years 1") == [
        "ingest bench has no option --history-years"
    ]


def test_a_synopsis_with_placeholders_and_alternatives_is_read_as_the_cli() -> None:
    assert (
        cli_problems("ingest migrate up [--to V] | down [--steps N] | status | create NAME") == []
    )
    assert cli_problems("ingest <command> --help") == []
    assert cli_problems("ingest migrate up | sideways") == [
        "ingest migrate has no subcommand sideways"
    ]
