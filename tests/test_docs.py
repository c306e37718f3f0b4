"""The documentation holds together: README.md is a front page (the two first commands first,
every `resnetdist` command it shows one the CLI has, a map of every package folder and module), and every relative link in README.md,
docs/*.md and tests/README.md reaches an existing file (and heading, for #anchors)."""

from __future__ import annotations

import itertools
import re
import shlex
import sys
from pathlib import Path

import typer.main

from resnetdist.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FIRST_COMMANDS = ("bash launch/setup.sh && .venv/bin/resnetdist train --n 3", "bash .ci/run")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    return [README, REPO / "tests" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        rel = dest.relative_to(REPO).as_posix() if dest.is_relative_to(REPO) else str(dest)
        if not dest.exists():
            broken.append(f"{target} (no file {rel})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel})")
    return broken


def test_every_relative_link_reaches_a_file_and_heading():
    broken = {p.relative_to(REPO).as_posix(): b for p in pages() if (b := broken_links(p))}
    assert not broken, broken


def readme_commands(text: str) -> list[list[str]]:
    """The words of each `resnetdist ...` command in README.md's code blocks, after the program
    name, its comment cut off."""
    found = []
    for block in FENCE.finditer(text):
        for line in block.group(0).splitlines()[1:-1]:
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word.endswith("resnetdist") and (i == 0 or words[i - 1] == "&&"):
                    found.append(list(itertools.takewhile(lambda w: w != "&&", words[i + 1:])))
    return found


def unknown_words(words: list[str], command) -> list[str]:
    """The subcommands and options of `words` that the CLI (a click command tree) does not have."""
    while words and words[0] in getattr(command, "commands", {}):
        command, words = command.commands[words[0]], words[1:]
    options = {name for p in command.params for name in (*p.opts, *p.secondary_opts)}
    options |= {"--help", "-h"} | ({"--install-completion", "--show-completion"} if command is ROOT else set())
    return [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in options]


ROOT = typer.main.get_command(app)


def test_readme_commands_are_the_clis():
    """Every `resnetdist` command README.md shows names a subcommand and options the CLI has:
    a renamed flag or command fails here, not in a newcomer's terminal."""
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10 and ["train", "--n", "3"] in commands, commands
    wrong = {" ".join(words): bad for words in commands if (bad := unknown_words(words, ROOT))}
    assert not wrong, f"README.md shows options the CLI does not have: {wrong}"
    assert unknown_words(["train", "--depht", "20"], ROOT) == ["--depht"]  # the check sees a wrong one


def test_readme_names_only_commands_the_cli_has():
    commands = readme_commands(README.read_text())
    unknown = sorted({words[0] for words in commands if words and not words[0].startswith("-")} - set(ROOT.commands))
    assert not unknown, f"README.md shows commands the CLI does not have: {unknown}"


def test_readme_opens_with_the_two_first_commands():
    first_block = FENCE.search(README.read_text())
    assert first_block, "README.md has no code block"
    commands = [line.split("#")[0].strip() for line in first_block.group(0).splitlines()[1:-1]]
    assert tuple(c for c in commands if c) == FIRST_COMMANDS


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages missing from README.md's map: {unlinked}"


def test_readme_maps_every_package_folder_and_module():
    text = README.read_text()
    package = REPO / "resnetdist"
    names = [f"resnetdist/{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()]
    names += [f"resnetdist/{p.name}" for p in package.glob("*.py") if not p.name.startswith("__")]
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"README.md's package map does not name {missing}"


def test_the_link_checker_sees_a_broken_link(tmp_path, monkeypatch):
    """The checks above cannot pass vacuously: a missing file and a missing heading are found;
    code spans and web addresses are not links to check."""
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text("[x](docs/b.md#real-heading) [y](docs/gone.md) [z](docs/b.md#nope)\n"
                    "`[code](docs/gone.md)` [w](https://example.org/x)\n")
    assert broken_links(page) == ["docs/gone.md (no file docs/gone.md)",
                                  "docs/b.md#nope (no heading #nope in docs/b.md)"]
