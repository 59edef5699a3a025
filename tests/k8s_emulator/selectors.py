"""Label and field selectors, parsed and matched like the Kubernetes API server (pure).

Label selectors follow ``k8s.io/apimachinery/pkg/labels`` syntax::

    selector    := "" | requirement ("," requirement)*
    requirement := "!" key | key | key ("=" | "==" | "!=") value
                 | key ("in" | "notin") "(" value ("," value)* ")" | key (">" | "<") integer

``!=`` and ``notin`` also match objects that lack the key; ``key=`` means "equals the empty
string". Keys and values are checked against the label syntax, as the server does (a bad one
is a 400 ``BadRequest``).

Field selectors follow ``k8s.io/apimachinery/pkg/fields``: comma-separated ``key=value``,
``key==value`` or ``key!=value`` terms, with ``\\,``, ``\\=`` and ``\\\\`` escapes in values.
A field the object does not have reads as ``""`` (so ``spec.nodeName=`` selects unscheduled
pods). Which field keys a resource supports is the caller's business (see ``resources``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "FieldSelector",
    "FieldTerm",
    "LabelSelector",
    "Requirement",
    "SelectorError",
    "label_key_problem",
    "label_value_problem",
    "parse_field_selector",
    "parse_label_selector",
]

_NAME_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_OPERATORS = ("!=", "==", "=", "(", ")", ",", "!", ">", "<")


class SelectorError(ValueError):
    """A selector the API server would reject with 400 BadRequest."""


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``None`` when it is)."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return f"invalid label key {key!r}: prefix part must be non-empty"
        if len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix):
            return f"invalid label key {key!r}: prefix part must be a lowercase RFC 1123 subdomain"
    if not name:
        return f"invalid label key {key!r}: name part must be non-empty"
    if len(name) > 63:
        return f"invalid label key {key!r}: name part must be no more than 63 characters"
    if not _NAME_RE.match(name):
        return (
            f"invalid label key {key!r}: name part must consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value (``None`` when it is)."""
    if value == "":
        return None
    if len(value) > 63:
        return f"invalid label value {value!r}: must be no more than 63 characters"
    if not _NAME_RE.match(value):
        return (
            f"invalid label value {value!r}: a valid label must be an empty string or consist "
            "of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character"
        )
    return None


@dataclass(frozen=True)
class Requirement:
    """One label requirement; ``op`` is one of exists, !, =, !=, in, notin, >, <."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        if not present:
            return False
        try:
            have = int(labels[self.key])
        except ValueError:
            return False
        bound = int(self.values[0])
        return have > bound if self.op == ">" else have < bound


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; the empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(req.matches(labels) for req in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        for op in _OPERATORS:
            if text.startswith(op, i):
                tokens.append(op)
                i += len(op)
                break
        else:
            start = i
            while i < len(text) and not text[i].isspace() and text[i] not in "!=(),<>":
                i += 1
            tokens.append(text[start:i])
    return tokens


class _LabelParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0

    def fail(self, why: str) -> SelectorError:
        return SelectorError(f"unable to parse requirement: {why} (in {self.text!r})")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def identifier(self, what: str) -> str:
        tok = self.take()
        if tok is None or tok in _OPERATORS:
            raise self.fail(f"expected {what}, found {tok or 'end of string'}")
        return tok

    def parse(self) -> LabelSelector:
        reqs: list[Requirement] = []
        if self.peek() is None:
            return LabelSelector()
        while True:
            reqs.append(self.requirement())
            tok = self.take()
            if tok is None:
                break
            if tok != ",":
                raise self.fail(f"expected ',' after a requirement, found {tok!r}")
        return LabelSelector(tuple(reqs))

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.take()
            key = self.key()
            return Requirement(key, "!")
        key = self.key()
        op = self.peek()
        if op is None or op == ",":
            return Requirement(key, "exists")
        self.take()
        if op in ("=", "==", "!="):
            nxt = self.peek()
            value = "" if nxt is None or nxt == "," else self.identifier("a value")
            self.value(value)
            return Requirement(key, "!=" if op == "!=" else "=", (value,))
        if op in ("in", "notin"):
            return Requirement(key, op, self.value_set())
        if op in (">", "<"):
            value = self.identifier("an integer")
            if not re.fullmatch(r"-?[0-9]+", value):
                raise self.fail(f"for '{op}' operator, the value must be an integer: {value!r}")
            return Requirement(key, op, (value,))
        raise self.fail(f"unknown operator {op!r} after key {key!r}")

    def key(self) -> str:
        key = self.identifier("a label key")
        if key in ("in", "notin"):
            raise self.fail(f"expected a label key, found keyword {key!r}")
        problem = label_key_problem(key)
        if problem:
            raise self.fail(problem)
        return key

    def value(self, value: str) -> str:
        problem = label_value_problem(value)
        if problem:
            raise self.fail(problem)
        return value

    def value_set(self) -> tuple[str, ...]:
        if self.take() != "(":
            raise self.fail("expected '(' after in/notin")
        values: list[str] = []
        expect_value = True
        while True:
            tok = self.take()
            if tok is None:
                raise self.fail("unterminated value set")
            if tok == ")":
                if expect_value:
                    values.append("")
                break
            if tok == ",":
                if expect_value:
                    values.append("")
                expect_value = True
                continue
            if not expect_value or tok in _OPERATORS:
                raise self.fail(f"unexpected {tok!r} in value set")
            values.append(self.value(tok))
            expect_value = False
        return tuple(values)


def parse_label_selector(text: str | None) -> LabelSelector:
    """Parse a ``labelSelector`` query value; raises :class:`SelectorError`."""
    return _LabelParser(text or "").parse()


@dataclass(frozen=True)
class FieldTerm:
    key: str
    op: str  # "=" or "!="
    value: str

    def matches(self, fields: Mapping[str, str]) -> bool:
        have = fields.get(self.key, "")
        return have == self.value if self.op == "=" else have != self.value


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[FieldTerm, ...] = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        return all(term.matches(fields) for term in self.terms)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(term.key for term in self.terms)


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(value: str, term: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                raise SelectorError(f"invalid field selector: invalid escape sequence in {term!r}")
            out.append(value[i + 1])
            i += 2
            continue
        if ch in ",=":
            raise SelectorError(f"invalid field selector: unescaped {ch!r} in {term!r}")
        out.append(ch)
        i += 1
    return "".join(out)


def _split_term(term: str) -> tuple[str, str, str]:
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], "!=" if op == "!=" else "=", term[i + len(op) :]
        i += 1
    raise SelectorError(f"invalid selector: {term!r}; can't understand {term!r}")


def parse_field_selector(text: str | None) -> FieldSelector:
    """Parse a ``fieldSelector`` query value; raises :class:`SelectorError`."""
    text = text or ""
    if not text.strip():
        return FieldSelector()
    terms: list[FieldTerm] = []
    for raw in _split_unescaped(text, ","):
        if not raw:
            continue
        key, op, value = _split_term(raw)
        key = key.strip()
        if not key:
            raise SelectorError(f"invalid field selector: empty key in {raw!r}")
        terms.append(FieldTerm(key, op, _unescape(value, raw)))
    return FieldSelector(tuple(terms))
