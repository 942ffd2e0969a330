"""`.caexclude` files: casync's gitignore-like exclusion rules (EXCLUDE_FILE).

A line is a pattern (fnmatch, with a leading dot matched only explicitly);
`!` negates, a `/` anywhere anchors it to the directory holding the file,
a trailing `/` matches directories only, `#` starts a comment. Unanchored
rules apply at every level below; a negative match wins over a positive one.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

POSITIVE, NEGATIVE, INNER = "positive", "negative", "inner"


@dataclass
class Rule:
    kind: str
    pattern: bytes
    anchored: bool
    directory_only: bool
    children: list[Rule] = field(default_factory=list)

    def matches(self, name: bytes, is_dir: bool) -> bool:
        if self.directory_only and not is_dir:
            return False
        if name.startswith(b".") and not self.pattern.startswith(b"."):
            return False  # FNM_PERIOD
        return fnmatch.fnmatchcase(name, self.pattern)


def parse_line(line: bytes) -> Rule | None:
    """One rule chain for a line, or None for blanks, comments and invalid lines."""
    line = line.strip()
    if not line or line.startswith(b"#"):
        return None
    kind = POSITIVE
    if line.startswith(b"!"):
        kind, line = NEGATIVE, line[1:]
    anchored = b"/" in line
    line = line.lstrip(b"/")
    parts: list[tuple[bytes, bool]] = []
    while line:
        name, sep, rest = line.partition(b"/")
        if name in (b"", b".", b".."):
            return None
        parts.append((name, bool(sep)))
        line = rest.lstrip(b"/")
    if not parts:
        return None
    first: Rule | None = None
    current: Rule | None = None
    for i, (name, dir_only) in enumerate(parts):
        rule = Rule(kind if i == len(parts) - 1 else INNER, name, anchored or i > 0, dir_only)
        if current is None:
            first = rule
        else:
            current.children.append(rule)
        current = rule
    return first


def parse_file(data: bytes) -> list[Rule]:
    return [r for r in (parse_line(line) for line in data.splitlines()) if r is not None]


def test(rules: list[Rule], name: bytes, is_dir: bool) -> tuple[bool, list[Rule]]:
    """(excluded?, rules that apply inside `name` if it is a directory)."""
    positive = negative = False
    subtree: list[Rule] = []
    for rule in rules:
        if not rule.anchored and is_dir:
            subtree.append(rule)
        if not rule.matches(name, is_dir):
            continue
        if rule.kind == NEGATIVE:
            negative = True
        elif rule.kind == POSITIVE:
            positive = True
        elif is_dir:
            subtree.extend(rule.children)
    return positive and not negative, subtree
