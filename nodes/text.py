"""ComfyUI's text nodes (``comfy_extras/nodes_string.py``): format, substring, length, case,
trim, replace, contains, compare, regular expressions, and a value from JSON in text.

Prompts come from anyone who can queue one, so nothing here may hang or eat the memory:

- **Regular expressions** run on the ``regex`` package (the syntax of Python's ``re``, which
  ComfyUI uses) with a time limit of ``REGEX_SECONDS`` per node; a catastrophic pattern such
  as ``(a+)+$`` fails the node with a message naming it instead of holding the worker. Texts
  longer than ``MAX_TEXT`` characters and patterns longer than ``MAX_PATTERN`` are refused.
- **Format strings** (``StringFormat``) may not reach into attributes or items of the values
  (``{a.__class__}``), and a field width or precision over ``MAX_FORMAT_WIDTH`` is refused.
"""

from __future__ import annotations

import json
import re
import string as _string
from typing import Any

from nodeflow import Bool, Combo, Int, Node, Output, Socket, String
from nodeflow.spec import ANY

#: Limits for text that comes from prompts (see the module docs).
REGEX_SECONDS = 2.0
MAX_TEXT = 1_000_000
MAX_PATTERN = 10_000
MAX_FORMAT_WIDTH = 10_000
FORMAT_NAMES = list(_string.ascii_lowercase)


class StringFormat(Node):
    """Python's ``str.format`` over the values a, b, c, ...: ``"{a} and {b:.2f}"``."""

    category = "text"
    display_name = "Format Text"
    inputs = {"f_string": String(default="{a}", multiline=True)}
    optional = {f"values.{n}": Socket(ANY) for n in FORMAT_NAMES}
    outputs = [Output("STRING")]

    def run(self, f_string, **values):
        given = {key.partition(".")[2]: v for key, v in values.items()}
        try:
            return (_SafeFormatter().format(f_string, **given),)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"format text {f_string!r}: no value for {exc}") from None
        except ValueError as exc:
            raise ValueError(f"format text {f_string!r}: {exc}") from None


class _SafeFormatter(_string.Formatter):
    """``str.format`` without attribute or item access and without huge padding."""

    def get_field(self, field_name, args, kwargs):
        if any(c in field_name for c in ".["):
            raise ValueError(f"field {{{field_name}}} reaches into a value; only plain names (a, b, ...) are allowed")
        return super().get_field(field_name, args, kwargs)

    def format_field(self, value, format_spec):
        for number in re.findall(r"\d+", format_spec):
            if int(number) > MAX_FORMAT_WIDTH:
                raise ValueError(f"format spec {format_spec!r} asks for more than {MAX_FORMAT_WIDTH} characters")
        return super().format_field(value, format_spec)


class StringSubstring(Node):
    """The characters from ``start`` to ``end`` (Python slicing: negative counts from the end)."""

    category = "text"
    display_name = "Substring"
    inputs = {"string": String(multiline=True), "start": Int(), "end": Int()}
    outputs = [Output("STRING")]

    def run(self, string, start, end):
        return (string[start:end],)


class StringLength(Node):
    """The number of characters of a text."""

    category = "text"
    display_name = "Text Length"
    inputs = {"string": String(multiline=True)}
    outputs = [Output("INT", "length")]

    def run(self, string):
        return (len(string),)


class CaseConverter(Node):
    """UPPERCASE, lowercase, Capitalize (the first letter) or Title Case (each word)."""

    category = "text"
    display_name = "Convert Text Case"
    inputs = {"string": String(multiline=True),
              "mode": Combo(choices=["UPPERCASE", "lowercase", "Capitalize", "Title Case"])}
    outputs = [Output("STRING")]

    def run(self, string, mode):
        convert = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
                   "Title Case": str.title}[mode]
        return (convert(string),)


class StringTrim(Node):
    """Removes white space at both ends, at the left or at the right."""

    category = "text"
    display_name = "Trim Text"
    inputs = {"string": String(multiline=True), "mode": Combo(choices=["Both", "Left", "Right"])}
    outputs = [Output("STRING")]

    def run(self, string, mode):
        return ({"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}[mode](string),)


class StringReplace(Node):
    """Replaces every occurrence of ``find`` with ``replace`` (plain text, no patterns)."""

    category = "text"
    display_name = "Replace Text"
    inputs = {"string": String(multiline=True), "find": String(multiline=True), "replace": String(multiline=True)}
    outputs = [Output("STRING")]

    def run(self, string, find, replace):
        if find == "":
            return (string,)  # Python would insert `replace` between every character
        if replace and len(string) + string.count(find) * max(0, len(replace) - len(find)) > MAX_TEXT:
            raise ValueError(f"Replace Text: the result would be longer than {MAX_TEXT:,} characters")
        return (string.replace(find, replace),)


class StringContains(Node):
    """Whether ``substring`` occurs in ``string``."""

    category = "text"
    display_name = "Contains Text"
    inputs = {"string": String(multiline=True), "substring": String(multiline=True),
              "case_sensitive": Bool(default=True)}
    outputs = [Output("BOOLEAN", "contains")]

    def run(self, string, substring, case_sensitive):
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


class StringCompare(Node):
    """Whether ``string_a`` starts with, ends with or equals ``string_b``."""

    category = "text"
    display_name = "Compare Text"
    inputs = {"string_a": String(multiline=True), "string_b": String(multiline=True),
              "mode": Combo(choices=["Starts With", "Ends With", "Equal"]), "case_sensitive": Bool(default=True)}
    outputs = [Output("BOOLEAN")]

    def run(self, string_a, string_b, mode, case_sensitive):
        a, b = (string_a, string_b) if case_sensitive else (string_a.lower(), string_b.lower())
        return ({"Equal": a == b, "Starts With": a.startswith(b), "Ends With": a.endswith(b)}[mode],)


# -- regular expressions ---------------------------------------------------------------------------


def _flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    import regex

    return ((regex.IGNORECASE if case_insensitive else 0) | (regex.MULTILINE if multiline else 0)
            | (regex.DOTALL if dotall else 0))


def _bounded(node: str, pattern: str, text: str, run):
    """Run ``run(regex_module)`` within the limits (see the module docs). ``None`` when the
    pattern does not compile (ComfyUI's nodes then give their empty result)."""
    import regex

    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"{node}: the pattern is {len(pattern):,} characters long; the limit is {MAX_PATTERN:,}")
    if len(text) > MAX_TEXT:
        raise ValueError(f"{node}: the text is {len(text):,} characters long; the limit is {MAX_TEXT:,}")
    try:
        return run(regex)
    except regex.error:
        return None
    except TimeoutError:
        raise ValueError(f"{node}: the pattern {pattern!r} took more than {REGEX_SECONDS:g} s on a text of "
                         f"{len(text):,} characters (catastrophic backtracking?); simplify it") from None


class RegexMatch(Node):
    """Whether the pattern matches anywhere in the text (false for a pattern that does not compile)."""

    category = "text"
    display_name = "Match Text"
    inputs = {"string": String(multiline=True), "regex_pattern": String(multiline=True),
              "case_insensitive": Bool(default=True), "multiline": Bool(default=False), "dotall": Bool(default=False)}
    outputs = [Output("BOOLEAN", "matches")]

    def run(self, string, regex_pattern, case_insensitive, multiline, dotall):
        flags = _flags(case_insensitive, multiline, dotall)
        found = _bounded("Match Text", regex_pattern, string,
                         lambda rx: rx.search(regex_pattern, string, flags, timeout=REGEX_SECONDS) is not None)
        return (bool(found),)


class RegexExtract(Node):
    """The first match, every match (one per line), the first match's group ``group_index``, or
    that group of every match; empty when nothing matches or the pattern does not compile.
    "All Matches" of a pattern with groups lists each match's first group, as ComfyUI does."""

    category = "text"
    display_name = "Extract Text"
    inputs = {"string": String(multiline=True), "regex_pattern": String(multiline=True),
              "mode": Combo(choices=["First Match", "All Matches", "First Group", "All Groups"]),
              "case_insensitive": Bool(default=True), "multiline": Bool(default=False), "dotall": Bool(default=False),
              "group_index": Int(default=1, min=0, max=100)}
    outputs = [Output("STRING")]

    def run(self, string, regex_pattern, mode, case_insensitive, multiline, dotall, group_index):
        flags = _flags(case_insensitive, multiline, dotall)

        def extract(rx) -> str:
            if mode == "First Match":
                match = rx.search(regex_pattern, string, flags, timeout=REGEX_SECONDS)
                return match.group(0) if match else ""
            if mode == "All Matches":
                found = rx.findall(regex_pattern, string, flags, timeout=REGEX_SECONDS)
                return "\n".join(m[0] if isinstance(m, tuple) else m for m in found)
            matches = rx.finditer(regex_pattern, string, flags, timeout=REGEX_SECONDS)
            if mode == "First Group":
                matches = [next(iter(matches), None)]
            else:   # "All Groups", as in ComfyUI: nothing from a pattern without groups
                matches = [m for m in matches if m.groups()]
            return "\n".join(g for g in (_group(m, group_index) for m in matches if m is not None) if g is not None)

        result = _bounded("Extract Text", regex_pattern, string, extract)
        return (result or "",)


def _group(match: Any, index: int) -> str | None:
    return match.group(index) if len(match.groups()) >= index else None


class RegexReplace(Node):
    """Replaces the matches of a pattern (``\\1`` and ``\\g<name>`` refer to groups); ``count``
    0 replaces them all. A pattern that does not compile fails the node."""

    category = "text"
    display_name = "Replace Text (Regex)"
    inputs = {"string": String(multiline=True), "regex_pattern": String(multiline=True),
              "replace": String(multiline=True)}
    optional = {"case_insensitive": Bool(default=True), "multiline": Bool(default=False), "dotall": Bool(default=False),
                "count": Int(default=0, min=0, max=100)}
    outputs = [Output("STRING")]

    def run(self, string, regex_pattern, replace, case_insensitive=True, multiline=False, dotall=False, count=0):
        import regex

        flags = _flags(case_insensitive, multiline, dotall)
        try:
            compiled = regex.compile(regex_pattern, flags) if len(regex_pattern) <= MAX_PATTERN else None
        except regex.error as exc:
            raise ValueError(f"Replace Text (Regex): the pattern {regex_pattern!r} does not compile: {exc}") from None
        result = _bounded("Replace Text (Regex)", regex_pattern, string,
                          lambda rx: compiled.sub(replace, string, count=count, timeout=REGEX_SECONDS))
        if len(result) > MAX_TEXT:
            raise ValueError(f"Replace Text (Regex): the result would be longer than {MAX_TEXT:,} characters")
        return (result,)


class JsonExtractString(Node):
    """The value of ``key`` in the first JSON object found in the text (also inside a Markdown
    code block), as text; empty when there is none or it lacks the key."""

    category = "text"
    display_name = "Extract Text from JSON"
    inputs = {"json_string": String(multiline=True), "key": String()}
    outputs = [Output("STRING")]

    def run(self, json_string, key):
        if len(json_string) > MAX_TEXT:
            raise ValueError(f"Extract Text from JSON: the text is longer than {MAX_TEXT:,} characters")
        decoder = json.JSONDecoder()
        start = json_string.find("{")
        while start != -1:
            try:
                data, _ = decoder.raw_decode(json_string, start)
            except (json.JSONDecodeError, RecursionError):
                start = json_string.find("{", start + 1)
                continue
            value = data.get(key)
            return ("" if value is None else str(value),)
        return ("",)
