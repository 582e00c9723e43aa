#!/usr/bin/env python3
"""Checks the book's links: every link between its pages names a page that
exists and, if it names an anchor, a heading of that page; every page is in
SUMMARY.md; no link leaves the book for a file of the repository (the
rendered book does not carry them: name such files as `code`); every
`{{#include file:ANCHOR}}` names a file and an anchor that exist, and the
included text has no links (they would resolve from the wrong place); no
mermaid diagram has a `;` or `%%` in its text (mermaid.js would stop
drawing it: look at the rendered page after changing one).
Links to other sites are not fetched. Exit status 1 and one line per
problem if any.

Usage: python3 docs/check-links.py
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text):
    """The lines of `text` outside fenced code blocks."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            yield line


def anchor(heading):
    """The id mdBook gives a heading: lowercase, letters, digits, `-` and
    `_` kept, spaces made `-`, everything else dropped."""
    heading = re.sub(r"`([^`]*)`", r"\1", heading)
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    out = []
    for c in heading.strip().lower():
        if c.isalnum() or c in "-_":
            out.append(c)
        elif c.isspace():
            out.append("-")
    return "".join(out)


def anchors(page):
    seen = {}
    ids = set()
    for line in prose(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = anchor(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


INCLUDE = re.compile(r"\{\{#include\s+([^}\s]+)\s*\}\}")


def included(page, spec):
    """The text `{{#include spec}}` on `page` brings in, or an error."""
    path, _, anchor = spec.partition(":")
    target = (page.parent / path).resolve()
    if not target.is_file():
        return None, f"includes {path!r}, which does not exist"
    text = target.read_text(encoding="utf-8")
    if not anchor:
        return text, None
    if anchor.isdigit() or ":" in anchor:
        return None, f"includes {spec!r} by line numbers, which shift: use an ANCHOR"
    m = re.search(
        rf"ANCHOR: {re.escape(anchor)}\b.*?\n(.*?)\n[^\n]*ANCHOR_END: {re.escape(anchor)}\b",
        text,
        re.S,
    )
    if not m:
        return None, f"includes {spec!r}: no ANCHOR {anchor!r} ... ANCHOR_END in {path}"
    return m.group(1), None


def main():
    problems = []
    pages = sorted(p for p in SRC.rglob("*.md"))
    summary = SRC / "SUMMARY.md"
    listed = set()
    for line in prose(summary.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            listed.add((SRC / target.split("#")[0]).resolve())
    for page in pages:
        if page != summary and page.resolve() not in listed:
            problems.append(f"{page.relative_to(SRC)}: not in SUMMARY.md")
    for page in pages:
        for spec in INCLUDE.findall(page.read_text(encoding="utf-8")):
            text, error = included(page, spec)
            if error:
                problems.append(f"{page.relative_to(SRC)}: {error}")
            elif not spec.endswith((".capnp", ".rs", ".toml")):
                # An included text's links would resolve from the page,
                # not from where they were written.
                for target in LINK.findall("\n".join(prose(text))):
                    problems.append(
                        f"{page.relative_to(SRC)}: included {spec!r} has a link {target!r}"
                    )
        for number, line in enumerate(prose(page.read_text(encoding="utf-8")), 1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue
                path, _, frag = target.partition("#")
                dest = (page.parent / path).resolve() if path else page.resolve()
                where = f"{page.relative_to(SRC)}: link {target!r}"
                if SRC.resolve() not in dest.parents and dest != SRC.resolve():
                    problems.append(f"{where} leaves the book")
                elif not dest.is_file():
                    problems.append(f"{where}: no such page")
                elif dest.suffix != ".md":
                    problems.append(f"{where}: not a page")
                elif frag and frag not in anchors(dest):
                    problems.append(f"{where}: no heading #{frag}")
    # mermaid.js ends a statement at ';' and starts a comment at '%%':
    # either in a diagram's text breaks the whole diagram.
    for page in pages:
        inside = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() == "```mermaid":
                inside = True
            elif inside and line.strip().startswith("```"):
                inside = False
            elif inside and (";" in line or "%%" in line):
                problems.append(f"{page.relative_to(SRC)}:{number}: ';' or '%%' in a mermaid diagram")
    for p in problems:
        print(p)
    print(f"{len(pages)} pages checked, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
