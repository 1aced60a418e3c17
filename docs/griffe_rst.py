"""A griffe extension: the reStructuredText bits of jaxbn's docstrings, as Markdown.

jaxbn's docstrings are Google style with RST inline markup, which the docstrings keep
(it reads well in ``help()`` and editors). ````code```` is already a Markdown code
span; this extension rewrites, when the site is built and only there:

- ``:func:`jaxbn.batch_norm``` (also ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``,
  ``:obj:``, ``:exc:``, ``~`` for the last component only) into a cross-reference to
  the API reference when it names a public jaxbn object (``jaxbn.X`` or a bare ``X``
  that ``jaxbn.__all__`` exports), else into plain code (private helpers, other
  libraries' objects);
- a paragraph's closing ``::`` (RST's "a literal block follows") into ``:``; the
  indented block that follows is already a Markdown code block;
- a line that starts with ``>`` or ``#`` (a wrapped ``finite and > 0``), escaped: in
  Markdown it would open a quote or a heading;
- a doctest (``>>>`` lines and their output) into a ``pycon`` code block: in an
  ``Example:`` section, which griffe renders as Markdown, it would read as quotes;
- an ``Args:`` entry for several parameters (``x, gamma, beta: as for ...``, its
  names possibly over several lines), which griffe's Google parser does not read,
  into one entry per parameter: each with the description when it is one line, else
  the first with it and the others referring to the first.
"""

from __future__ import annotations

import re

import griffe

_ARGS = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters|Attributes):\s*$"
)
_NAME = re.compile(r"^\*{0,2}[A-Za-z_]\w*$")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|obj|data|exc|const):`(~?)([^`]+)`")


class RstToMarkdown(griffe.Extension):
    """Rewrites the docstrings of a package's objects once the package is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        exports = {str(name) for name in (pkg.exports or ())}
        seen = set()
        stack = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                text = split_multi_name_args(obj.docstring.value)
                obj.docstring.value = rewrite(text, pkg.name, exports)
            stack.extend(m for m in obj.members.values() if not m.is_alias)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _expand_item(item: list[str], base: int) -> list[str]:
    """One ``Args:`` entry's lines; an entry for ``a, b, c`` becomes three entries."""
    k = next((k for k, line in enumerate(item) if ":" in line), None)
    if k is None:
        return item
    head = " ".join(part.strip() for part in item[:k]) + " " + item[k].strip()
    names_text, _, first = head.strip().partition(":")
    names = [n.strip() for n in names_text.split(",") if n.strip()]
    if len(names) < 2 or not all(_NAME.match(n) for n in names):
        return item
    rest = item[k + 1 :]
    if not first.strip() and rest:  # "a, b:" with the description below
        first, rest = rest[0].strip(), rest[1:]
    out = [" " * base + f"{names[0]}: {first.strip()}", *rest]
    for name in names[1:]:  # a one-line description repeated, a longer one referred to
        again = first.strip() if not rest else f"as for ``{names[0]}``."
        out.append(" " * base + f"{name}: {again}")
    return out


def split_multi_name_args(text: str) -> str:
    """Google ``Args:`` entries naming several parameters, one entry per parameter."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = _ARGS.match(lines[i])
        i += 1
        if not m:
            continue
        header = len(m.group(1))
        body = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > header):
            if not lines[i].strip() and (i + 1 == len(lines) or _indent(lines[i + 1]) <= header):
                break
            body.append(lines[i])
            i += 1
        if not body:
            continue
        base = _indent(body[0])
        item: list[str] = []
        for line in body:
            if line.strip() and _indent(line) == base and item:
                out.extend(_expand_item(item, base))
                item = []
            item.append(line)
        out.extend(_expand_item(item, base))
    return "\n".join(out)


def _target(name: str, package: str, exports: set[str]) -> str | None:
    """The public identifier a role names, or None for one the site does not document."""
    name = name.strip().lstrip(".")
    if "." not in name:
        return f"{package}.{name}" if name in exports else None
    parts = name.split(".")
    if parts[0] != package or any(p.startswith("_") for p in parts[1:]):
        return None
    return name


def _literal_marker(before: str) -> str:
    """RST's ``::``: "text::" -> "text:", "text ::" -> "text", a lone "::" -> ""."""
    if not before.strip():
        return ""
    return before.rstrip() if before.endswith(" ") else before + ":"


def fence_doctests(text: str) -> str:
    """Each run of doctest lines (``>>>`` to the next blank line or dedent), fenced.

    Not in a docstring with an ``Examples:`` section: griffe reads doctests there.
    """
    lines = text.splitlines()
    if any(line.strip() == "Examples:" for line in lines):
        return text
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        pad = " " * _indent(line)
        out.append(pad + "```pycon")
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) >= len(pad):
            out.append(lines[i])
            i += 1
        out.append(pad + "```")
    return "\n".join(out)


def rewrite(text: str, package: str, exports: set[str]) -> str:
    """One docstring's doctests, RST roles and literal-block markers, as Markdown."""
    text = fence_doctests(text)

    def role(m):
        short, name = m.group(1), m.group(2).strip()
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _target(name, package, exports)
        return f"[`{shown}`][{target}]" if target else f"`{shown}`"

    lines = []
    fence = False
    literal = None  # the indent of the line that opened an RST literal block
    for line in text.splitlines():
        if literal is not None:
            if not line.strip() or _indent(line) > literal:
                lines.append(line)  # inside the literal block: code, kept as it is
                continue
            literal = None
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence:
            line = _ROLE.sub(role, line)
            stripped = line.lstrip()
            if stripped.startswith((">", "#")) and not stripped.startswith(">>>"):
                # a wrapped "... and\n> 0" is text in RST, not a Markdown quote or heading
                line = line[: len(line) - len(stripped)] + "\\" + stripped
            if line.rstrip().endswith("::"):
                literal = _indent(line)
                line = _literal_marker(line.rstrip()[:-2])
        lines.append(line)
    return "\n".join(lines)
