"""Plain-SQL dumps: find the psql meta-commands in one, and replay it with every one refused.

A plain dump is a psql script, and psql runs a backslash command wherever its lexer meets an
unquoted backslash: at the start of a line or after SQL on the same line, outside string
literals, quoted identifiers, dollar quotes, comments and COPY data. A hostile dump can so carry
``\\!`` (a shell command), ``\\o``/``\\w`` (write files), ``\\copy ... program``, ``\\i`` or
``\\connect``. pgkeeper never runs one, whoever made the dump (DESIGN.md, invariant 13):

``Scanner``  follows a dump as psql's lexer does ('' strings, E'' strings with
             ``standard_conforming_strings`` tracked, "identifiers", $tag$ bodies, -- and nested
             /* */ comments, ``COPY ... FROM stdin`` data up to its ``\\.`` line) and stops at
             the first meta-command. The only ones it lets pass are pg_dump's own
             ``\\restrict KEY`` / ``\\unrestrict KEY`` lines (pg_dump 13.22, 14.19, 15.14, 16.10,
             17.6 and later), KEY being the one the dump declares before its first statement.
             Verification uses it to refuse a dump, naming the line and the command.
``Replay``   is what a restore pipes into psql: first our own ``\\restrict <random key>``, so
             psql itself refuses every meta-command (safety does not rest on this module's
             lexer: psql's is the one that counts), then the dump with pg_dump's own key lines
             blanked (inside our restricted mode psql would refuse them) and cut short at the
             first other meta-command, so the error can name it. Blanking keeps line numbers.

The lexer simplifies where only a hand-made dump could tell: parentheses and ``BEGIN ATOMIC``
do not hide a ``;`` from it, and a ``COPY ... FROM stdin`` is recognised by its text. Being
wrong there can only make it refuse a dump, or miss a command that psql then refuses.

Cost: runs of ordinary SQL (with their '' strings) are consumed by one compiled regex and COPY
data, the bulk of a dump, by ``bytes.find`` of its ``\\.`` line, so a 1 MiB chunk costs a few
Python steps; state (and at most a few bytes) carries across chunk boundaries.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

HEADER = b"-- PostgreSQL database dump"
TRAILER = b"-- PostgreSQL database dump complete"
# pg_dumpall's: a server's globals (--globals-only), or a whole cluster with its databases.
CLUSTER_HEADER = b"-- PostgreSQL database cluster dump"
CLUSTER_TRAILER = b"-- PostgreSQL database cluster dump complete"

# psql versions that have \restrict (the August 2025 minor releases; every 18).
_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


def psql_can_restrict(version: str) -> bool:
    """Whether psql ``version`` (e.g. ``15.18``) knows ``\\restrict``."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if match is None:
        return False
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    if major >= 18:
        return True
    return major in _RESTRICT_SINCE and minor >= _RESTRICT_SINCE[major]


@dataclass(frozen=True)
class MetaCommand:
    """The first psql meta-command of a dump that pgkeeper would not let through."""

    line: int  # 1-based line of the dump
    name: str  # as psql reads it (``!``, ``o``, ``copy``...), made printable

    def __str__(self) -> str:
        if self.name in ("c", "connect"):
            return (
                f"psql meta-command \\{self.name} at line {self.line}, which would switch the "
                "restore to another database: make the dump without pg_dump --create"
            )
        return (
            f"psql meta-command \\{self.name} at line {self.line}, which pgkeeper never runs: "
            "a plain dump must hold SQL only"
        )


_SQL, _QUOTE, _EQUOTE, _DQUOTE, _DOLLAR, _LINE_COMMENT, _BLOCK_COMMENT, _COPY, _REST = range(9)
_IDENT = rb"A-Za-z0-9_$\x80-\xff"  # bytes that continue an identifier (psql's ident_cont)


def _run(quote: bytes) -> re.Pattern[bytes]:
    """Ordinary SQL up to the next byte that needs a decision, complete strings included. Every
    alternative that depends on the next byte requires it to be there, so the run never ends
    inside a token at a chunk's end."""
    return re.compile(
        rb"(?:[^'\"\\;$Ee/\-]++"
        + quote  # a complete '' string
        + rb"|\"[^\"]*+\""
        + rb"|(?<=[%s])[Ee]" % _IDENT  # E inside a word: not an E'' string
        + rb"|[Ee](?=[^'])"
        + rb"|-(?=[^-])|/(?=[^*])"
        + rb"|(?<=[%s])\$" % _IDENT  # $ inside a word: not a dollar quote
        + rb"|\$(?=[^A-Za-z_\x80-\xff$]))*+"  # $1 and the like
    )


_RUN_STANDARD = _run(rb"|'[^']*+'")  # standard_conforming_strings on: backslash is a letter
_RUN_ESCAPING = _run(rb"|'(?:[^'\\]|\\.)*+'")  # off: backslash escapes, as in E''
_BLANKS = re.compile(rb"\s*+")
_WORD = re.compile(rb"[A-Za-z]++")
_DOLLAR_TAG = re.compile(rb"\$([A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*+)?(\$?)")
_ESCAPE_OR_QUOTE = re.compile(rb"[\\']")
_COMMENT_MARK = re.compile(rb"/\*|\*/")
_OWN_KEY_LINE = re.compile(rb"\\(un)?restrict[ \t]+([A-Za-z0-9]+)[ \t]*\r?")
_COMMAND_NAME = re.compile(rb"[^\s\\]*")
_QUOTED = re.compile(rb"'[^']*'|\"[^\"]*\"")
_FROM_STDIN = re.compile(rb"\bfrom\s+stdin\b", re.IGNORECASE)
_BINARY = re.compile(rb"\bbinary\b", re.IGNORECASE)
_STD_STRINGS = re.compile(
    rb"set\s+(?:session\s+)?standard_conforming_strings\s*(?:=|\bto\b)\s*'?(\w+)'?\s*$",
    re.IGNORECASE,
)
_STATEMENT_CAP = 1 << 20  # a COPY or SET statement's text kept to judge it (column lists)
_LINE_CAP = 4096  # a backslash line longer than this is no pg_dump key line


class Scanner:
    """Follows a plain dump fed in chunks; ``found`` is its first foreign meta-command.

    ``feed`` returns the bytes to hand to psql (pg_dump's own key lines blanked), which lag
    the input by a few bytes at most; ``finish`` returns the rest. After a find, both return
    only what came before it.
    """

    def __init__(self) -> None:
        self.found: MetaCommand | None = None
        self.key: bytes | None = None  # pg_dump's restrict key, as the dump declares it
        self._mode = _SQL
        self._resume = _SQL  # the mode to go back to after COPY data
        self._std_strings = True
        self._depth = 0  # of nested /* */ comments
        self._delimiter = b""  # of the dollar quote we are in
        self._kind: bytes | None = None  # b"copy", b"set", b"" (other); None: between statements
        self._statement = bytearray()  # the text of a COPY or SET statement so far
        self._seen_sql = False
        self._copy_next = False  # COPY data starts after the current line
        self._copy_to_end = False  # binary COPY: psql sends the rest of the input as data
        self._pending = b""
        self._prev = b"\n"  # the byte before the pending ones: context for lookbehinds
        self._lines = 0  # newlines before the pending bytes
        self._drops: list[tuple[int, int]] = []

    # --- feeding --------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        return self._feed(data, final=False)

    def finish(self) -> bytes:
        """End of the dump: judge what was held back; return the last bytes to replay."""
        return self._feed(b"", final=True)

    def _feed(self, data: bytes, final: bool) -> bytes:
        if self.found is not None:
            return b""
        if (
            self._mode == _COPY
            and not (final or self._pending)
            and len(data) > 2
            and data.find(b"\n\\.") < 0
            and not (self._prev == b"\n" and data.startswith(b"\\."))
            and not data.endswith(b"\n\\")
        ):  # the bulk of a dump: a chunk of COPY data that cannot hold its end, passed uncopied
            self._lines += data.count(b"\n")
            self._prev = data[-1:]
            return data
        buf = self._prev + self._pending + data
        self._drops = []
        pos = self._scan(buf, 1, final)
        out = []
        start = 1
        for begin, end in self._drops:
            out.append(buf[start:begin])
            start = end
        out.append(buf[start:pos])
        self._lines += buf.count(b"\n", 1, pos)
        self._prev, self._pending = buf[pos - 1 : pos], buf[pos:]
        if final:
            self._pending = b""
        return b"".join(out)

    def _line_of(self, buf: bytes, pos: int) -> int:
        return self._lines + buf.count(b"\n", 1, pos) + 1

    # --- the lexer ----------------------------------------------------------------------

    def _scan(self, buf: bytes, pos: int, final: bool) -> int:
        """Consume ``buf`` from ``pos``; return where it stopped (needs more input, or found)."""
        size = len(buf)
        while pos < size and self.found is None:
            limit = size
            if self._copy_next:  # lex the rest of the COPY's line, then its data
                newline = buf.find(b"\n", pos)
                if newline >= 0:
                    limit = newline + 1
            more = limit == size and not final
            mode = self._mode
            if mode == _SQL:
                new = self._sql(buf, pos, limit, more)
            elif mode == _COPY:
                new = self._copy(buf, pos, more)
            elif mode == _REST:
                new = size
            elif mode == _QUOTE:
                if self._std_strings:
                    end = buf.find(b"'", pos, limit)
                    new, self._mode = (limit, _QUOTE) if end < 0 else (end + 1, _SQL)
                    self._keep(buf, pos, new)
                else:
                    new = self._escaped(buf, pos, limit, more)
            elif mode == _EQUOTE:
                new = self._escaped(buf, pos, limit, more)
            elif mode == _DQUOTE:
                end = buf.find(b'"', pos, limit)
                new, self._mode = (limit, _DQUOTE) if end < 0 else (end + 1, _SQL)
                self._keep(buf, pos, new)
            elif mode == _DOLLAR:
                end = buf.find(self._delimiter, pos, limit)
                if end >= 0:
                    new, self._mode = end + len(self._delimiter), _SQL
                else:  # keep what could be the start of the closing delimiter
                    new = max(pos, limit - len(self._delimiter) + 1) if more else limit
            elif mode == _LINE_COMMENT:
                end = buf.find(b"\n", pos, limit)
                new, self._mode = (limit, _LINE_COMMENT) if end < 0 else (end, _SQL)
            else:
                new = self._block_comment(buf, pos, limit, more)
            if new == pos and mode == self._mode:
                break  # needs more input
            pos = new
            if self._copy_next and pos == limit and buf[limit - 1 : limit] == b"\n":
                self._copy_next = False
                self._resume, self._mode = self._mode, _REST if self._copy_to_end else _COPY
        return pos

    def _sql(self, buf: bytes, pos: int, limit: int, more: bool) -> int:
        if self._kind is None:  # between statements: the first word tells COPY and SET apart
            pos = _BLANKS.match(buf, pos, limit).end()  # type: ignore[union-attr]
            if pos == limit:
                return pos
            word = _WORD.match(buf, pos, limit)
            if word is not None:
                if word.end() == limit and more and word.end() - pos < 8:
                    return pos
                name = word.group().lower()
                self._kind = name if name in (b"copy", b"set") else b""
                self._seen_sql = True
            elif buf[pos] not in b"-/\\":
                self._kind = b""
                self._seen_sql = True
        run = (_RUN_STANDARD if self._std_strings else _RUN_ESCAPING).match(buf, pos, limit)
        end = run.end() if run is not None else pos
        self._keep(buf, pos, end)
        if end == limit:
            return end
        char = buf[end]
        nxt = buf[end + 1 : end + 2] if end + 1 < limit else b""
        if char == ord(";"):
            self._end_statement()
            return end + 1
        if char == ord("'"):  # a string that does not end before the limit
            self._keep(buf, end, end + 1)
            self._mode = _QUOTE
            return end + 1
        if char == ord('"'):
            self._keep(buf, end, end + 1)
            self._mode = _DQUOTE
            return end + 1
        if char == ord("\\"):
            return self._backslash(buf, end, limit, more)
        if not nxt:
            return end if more else limit  # E, -, / or $ at the very end
        if char in b"Ee":  # E'' (the run takes every other E)
            self._keep(buf, end, end + 2)
            self._mode = _EQUOTE
            return end + 2
        if char == ord("-"):  # the run takes every other -
            self._mode = _LINE_COMMENT
            return end + 2
        if char == ord("/"):
            self._mode, self._depth = _BLOCK_COMMENT, 1
            return end + 2
        tag = _DOLLAR_TAG.match(buf, end, limit)
        assert tag is not None  # noqa: S101 - the run stops at $ only
        if tag.group(2):
            self._delimiter = tag.group()
            self._mode = _DOLLAR
            return tag.end()
        if tag.end() == limit and more and tag.end() - end < 256:
            return end  # a tag cut by the chunk's end
        return end + 1  # a $ that opens nothing

    def _keep(self, buf: bytes, start: int, end: int) -> None:
        if self._kind and end > start:
            self._statement += buf[start:end]
            if len(self._statement) > _STATEMENT_CAP:
                del self._statement[: len(self._statement) - _STATEMENT_CAP]

    def _end_statement(self) -> None:
        text = bytes(self._statement)
        if self._kind == b"copy":
            bare = _QUOTED.sub(b" ", text)
            if _FROM_STDIN.search(bare):
                self._copy_next = True
                self._copy_to_end = _BINARY.search(bare) is not None
        elif self._kind == b"set":
            match = _STD_STRINGS.match(text)
            if match is not None:
                value = match.group(1).lower()
                self._std_strings = value not in (b"off", b"false", b"no", b"0")
        self._kind = None
        self._statement.clear()

    def _backslash(self, buf: bytes, pos: int, limit: int, more: bool) -> int:
        nxt = buf[pos + 1 : pos + 2] if pos + 1 < limit else b""
        if not nxt and more:
            return pos
        if nxt in (b";", b":"):  # \; and \: are psql's way to write ; and : into a query
            self._keep(buf, pos, pos + 2)
            return pos + 2
        newline = buf.find(b"\n", pos, limit)
        if newline < 0:
            if more and limit - pos < _LINE_CAP:
                return pos
            newline = limit
        line = buf[pos:newline]
        own = _OWN_KEY_LINE.fullmatch(line)
        if own is not None:
            key = own.group(2)
            if self.key is None and own.group(1) is None and not self._seen_sql:
                self.key = key  # pg_dump's header line
            if key == self.key:
                self._drops.append((pos, newline))
                return newline
        name = _COMMAND_NAME.match(line, 1).group()  # type: ignore[union-attr]
        text = name[:40].decode("utf-8", "replace")
        printable = "".join(c if c.isprintable() else "?" for c in text)
        self.found = MetaCommand(line=self._line_of(buf, pos), name=printable)
        return pos

    def _escaped(self, buf: bytes, pos: int, limit: int, more: bool) -> int:
        """Inside a string where backslash escapes (E'', or '' with standard strings off)."""
        while True:
            hit = _ESCAPE_OR_QUOTE.search(buf, pos, limit)
            if hit is None:
                self._keep(buf, pos, limit)
                return limit
            at = hit.start()
            if at + 1 >= limit:  # an escape or a quote whose meaning is in the next byte
                if more:
                    self._keep(buf, pos, at)
                    return at
                self._keep(buf, pos, limit)
                self._mode = _SQL if buf[at] == ord("'") else self._mode
                return limit
            if buf[at] == ord("\\") or buf[at + 1] == ord("'"):  # \x or ''
                self._keep(buf, pos, at + 2)
                pos = at + 2
                continue
            self._keep(buf, pos, at + 1)
            self._mode = _SQL
            return at + 1

    def _block_comment(self, buf: bytes, pos: int, limit: int, more: bool) -> int:
        while True:
            hit = _COMMENT_MARK.search(buf, pos, limit)
            if hit is None:
                keep = more and buf[limit - 1 : limit] in (b"*", b"/")
                return limit - 1 if keep else limit
            pos = hit.end()
            self._depth += 1 if hit.group() == b"/*" else -1
            if self._depth == 0:
                self._mode = _SQL
                return pos

    def _copy(self, buf: bytes, pos: int, more: bool) -> int:
        """COPY data: every line up to one that is ``\\.`` alone (psql's end of data)."""
        while True:
            found = buf.find(b"\n\\.", pos - 1)  # buf[pos - 1] is there: a line may start at pos
            if found < 0:  # the last byte consumed is the next chunk's context: keep a \
                return max(pos, len(buf) - 1) if more and buf.endswith(b"\n\\") else len(buf)
            at = found + 1
            end = buf[at + 2 : at + 4]
            if end[:1] == b"\n" or end == b"\r\n":
                self._mode = self._resume
                return at + (3 if end[:1] == b"\n" else 4)
            if more and end in (b"", b"\r"):
                return max(at, pos)
            pos = at + 2


class Replay:
    """The stream psql reads in a restore: our ``\\restrict`` line, then the dump as
    ``Scanner`` passes it. ``found`` is set (and nothing more is passed) at a foreign
    meta-command; psql's line N is the dump's line N - 1."""

    def __init__(self) -> None:
        self._scanner = Scanner()
        # Random, never from the dump: nothing in the dump can leave our restricted mode.
        self.opening = b"\\restrict " + secrets.token_hex(32).encode() + b"\n"
        self._started = False

    @property
    def found(self) -> MetaCommand | None:
        return self._scanner.found

    def feed(self, data: bytes) -> bytes:
        out = self._scanner.feed(data)
        if not self._started:
            self._started = True
            return self.opening + out
        return out

    def finish(self) -> bytes:
        out = self._scanner.finish()
        if not self._started:
            self._started = True
            return self.opening + out
        return out
