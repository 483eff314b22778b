"""The documentation holds together: every relative link and anchor resolves, every ``rp2k``
subcommand and every error class is documented, and the README stays a short front door."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from rp2k_dist import errors
from rp2k_dist.cli import build_parser
from rp2k_dist.errors import TROUBLESHOOTING, Rp2kError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: Pages whose relative links must resolve (cluster/README.md links into docs/ too).
PAGES = [README, *sorted(DOCS.glob("*.md")), ROOT / "cluster" / "README.md"]
README_MAX_LINES = 220
SETUP_COMMANDS = ["./run demo", "./run tests"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


# --------------------------------------------------------------------------- markdown helpers


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(lines outside fenced code blocks, the fenced blocks' lines, in order)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: inline markup dropped, lowercase, punctuation other than
    '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of every ATX heading outside code blocks."""
    prose, _ = split_fences(text)
    return [(len(m.group(1)), m.group(2)) for m in map(HEADING.match, prose) if m]


def anchors(text: str) -> set[str]:
    """Every anchor of a page, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images outside code (blocks and inline spans)."""
    prose, _ = split_fences(text)
    return [m.group(1) for line in prose for m in LINK.finditer(INLINE_CODE.sub("", line))]


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``page`` whose file is missing (or outside ``root``), or whose
    ``#anchor`` names no heading of the target Markdown page."""
    problems = []
    text = page.read_text(encoding="utf-8")
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        if not file.exists() or not file.is_relative_to(root.resolve()):
            problems.append(f"{page.name}: {target}: no such file")
            continue
        if anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: {target}: no heading with anchor #{anchor} in {file.name}")
    return problems


def subcommands(parser: argparse.ArgumentParser, prefix: str = "rp2k") -> list[str]:
    """``rp2k NAME`` for every subcommand, and ``rp2k NAME SUB`` for nested ones (``rp2k jobs logs``)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append(f"{prefix} {name}")
                found += subcommands(sub, f"{prefix} {name}")
    return found


def error_classes() -> list[type[Rp2kError]]:
    """Every Rp2kError subclass defined in rp2k_dist/errors.py."""
    return [cls for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, Rp2kError) and cls is not Rp2kError
            and cls.__module__ == errors.__name__]


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert page.is_file(), page
    assert not broken_links(page), "\n".join(broken_links(page))


def test_the_pages_link_to_something():
    """The link check has work to do: the README links every page of docs/."""
    targets = {t.partition("#")[0] for t in links(README.read_text(encoding="utf-8"))}
    pages = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    assert pages and pages <= targets, f"docs/ pages the README does not link: {sorted(pages - targets)}"


def test_every_subcommand_has_an_example_in_docs():
    """Each ``rp2k NAME`` of the parser starts a command line in a code block of docs/."""
    examples = [line.strip() for page in sorted(DOCS.glob("*.md"))
                for block in split_fences(page.read_text(encoding="utf-8"))[1] for line in block]
    names = subcommands(build_parser())
    assert "rp2k train" in names and "rp2k jobs logs" in names  # the parser walk sees nested commands
    missing = [name for name in names if not any(re.match(re.escape(name) + r"(?![\w-])", line) for line in examples)]
    assert not missing, f"subcommands without an example command in docs/: {missing}"


def test_every_error_class_has_its_troubleshooting_section():
    page = ROOT / TROUBLESHOOTING
    titles = {title for level, title in headings(page.read_text(encoding="utf-8")) if level in (2, 3)}
    classes = error_classes()
    assert len(classes) >= 10  # the family was found
    missing = [cls.__name__ for cls in classes if cls.__name__ not in titles]
    assert not missing, f"error classes without a '## ClassName' section in {TROUBLESHOOTING}: {missing}"


def test_every_hint_anchor_names_a_section():
    page_anchors = anchors((ROOT / TROUBLESHOOTING).read_text(encoding="utf-8"))
    wrong = [f"{cls.__name__}: #{anchor}" for cls in error_classes()
             for anchor in re.findall(re.escape(TROUBLESHOOTING) + r"#([\w-]+)", cls.hint)
             if anchor not in page_anchors]
    assert not wrong, f"hints pointing at no section of {TROUBLESHOOTING}: {wrong}"


def test_the_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into docs/"
    _, blocks = split_fences(text)
    commands = [line.split("#", 1)[0].strip() for line in blocks[0]]
    assert [c for c in commands if c] == SETUP_COMMANDS, "the README's first code block is the set-up: ./run demo, ./run tests"


# --------------------------------------------------------------------------- the checks can fail


def test_slugs_follow_github():
    assert slug("Choices the paper leaves open") == "choices-the-paper-leaves-open"
    assert slug("2. The metadata table (optional)") == "2-the-metadata-table-optional"
    assert slug("The ensemble, Table 3: `rp2k ensemble`") == "the-ensemble-table-3-rp2k-ensemble"
    assert slug("ConfigError") == "configerror"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A") == {"a", "a-1", "a-2"}


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Real section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#real-section) [self](#page) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#no-such-section) ![img](nope.png)\n"
        "`[in code](also-missing.md)`\n```\n[in a block](missing-too.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page, tmp_path) == [
        "page.md: missing.md: no such file",
        "page.md: other.md#no-such-section: no heading with anchor #no-such-section in other.md",
        "page.md: nope.png: no such file",
    ]
