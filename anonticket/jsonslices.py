"""Bounded, cooperative decoding of a large JSON-RPC answer (monero-wallet-rpc ``get_transfers``).

``json.loads`` of a whole answer runs on the reactor thread for as long as the body is large and
builds every object in it: a wallet that sends 60 MiB of ``{}`` takes the reactor for seconds and
the process to gigabytes.  A thread does not help, the C decoder holds the GIL for the whole call.

So the answer is walked here by hand at the levels that can be long (the JSON-RPC envelope, its
``result`` object and the arrays of entries in it), and only the values inside them are decoded
by the C decoder (``raw_decode`` at a position): one at a time, or a run of array items of a few
kilobytes at a time (see ``_Walker._chunk``).  Three bounds follow:

* a single decoded value is at most ``max_value`` characters: it is decoded from a window of the
  text that holds it whole, so even a failing decode scans at most the window;
* entries are counted as they are met, and past ``max_entries`` decoding stops
  (:class:`TooManyEntries`), before anything beyond the limit is built;
* :func:`rpc_answer` is a generator that yields the work done since its last yield, and
  :func:`run_sliced` runs it in slices of :data:`SLICE_COST`, giving the reactor a turn between
  slices.

Nothing from the body ever reaches an exception message: messages are fixed texts of this module
and key names chosen by the caller.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from twisted.internet.task import deferLater

T = TypeVar("T")
Steps = Generator[int, None, T]

# A transfer entry of monero-wallet-rpc is ~600 characters (~900 pretty-printed); 64 Ki leaves
# room for long notes and many `amounts` while keeping a failing decode cheap (~1 ms).
MAX_VALUE_CHARS: Final = 64 * 1024
# The envelope and `result` have a handful of members; thousands of tiny ones would be work
# without any entry to count.
MAX_MEMBERS: Final = 64
# Work units of one slice: about one unit per character scanned plus VALUE_COST per value (its
# Python-side overhead, which dominates for tiny values such as `{}`).  200,000 units are ~1-3 ms
# of CPU here (see bench/decode.py), so the reactor gets a turn a few hundred times a second.
SLICE_COST: Final = 200_000
VALUE_COST: Final = 200
# An item decoded in a chunk costs no Python-side overhead, only the C decoder's (~0.3 us).
_CHUNK_ITEM_COST: Final = 40
# A window reload decodes UTF-8 much faster than JSON is decoded: weigh its bytes lightly.
_RELOAD_DIVISOR: Final = 4

_WS = re.compile(r"[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*([,\]])[ \t\n\r]*")  # after an array item: to the next one
_BOUNDARY = re.compile(r"[ \t\n\r]*,[ \t\n\r]*\{")  # after `}`: a likely item boundary
_CHUNK_CHARS: Final = 16 * 1024  # array items decoded per call of the C decoder (see _chunk)
_CHUNK_LOOKS: Final = 16  # `}` looked at for a boundary before an item is decoded alone
_MAX_BACKOFF: Final = 1024  # items decoded alone after failed chunks in a row, at most
_NO_VALUE: Final = frozenset(("", ",", ":", "]", "}"))  # cannot start a JSON value
_REPORT: Final = 8192  # work reported in batches of about this much while walking an array
_SCAN = json.JSONDecoder().raw_decode


class MalformedJson(Exception):
    """The body is not JSON (or holds a single value larger than allowed)."""


class WrongShape(Exception):
    """The body is JSON but not the expected JSON-RPC shape."""


class TooManyEntries(Exception):
    """The answer holds more entries than allowed; decoding stopped there."""


@dataclass
class RpcAnswer:
    """What :func:`rpc_answer` found: the ``error`` member (``None`` if absent or null), whether
    ``result`` was an object, and the decoded arrays of ``result`` that were asked for."""

    error: Any = None
    result_ok: bool = False
    arrays: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class _Window:
    """Decoded text for a window of the UTF-8 body, with a cursor ``pos``.

    Only a window is decoded at a time: decoding a whole body up front would itself be a stall
    and, with one astral character in it, a str of four bytes per character.
    """

    def __init__(self, body: bytes, max_value: int) -> None:
        self._body = body
        self._max_value = max_value
        # Four bytes a character at most: the window always holds `max_value` characters.
        self._span = 4 * max_value
        self.text = ""
        self.pos = 0
        self._start = 0  # byte offset of text[0]
        self._stop = 0  # byte offset just past the window
        self.final = False  # the window reaches the end of the body

    def start(self) -> int:
        """Load the first window; returns the work done."""
        # json.loads(bytes) accepts a UTF-8 byte order mark; so do we.
        return self.load(len(codecs.BOM_UTF8) if self._body.startswith(codecs.BOM_UTF8) else 0)

    def load(self, offset: int) -> int:
        """Decode the window starting at byte ``offset``; returns the work done."""
        body = self._body
        stop = min(len(body), offset + self._span)
        # Never cut a UTF-8 sequence: back off over (at most three) continuation bytes.
        back = 0
        while stop < len(body) and back < 3 and body[stop] & 0xC0 == 0x80:
            stop -= 1
            back += 1
        try:
            self.text = body[offset:stop].decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedJson("body is not JSON") from None
        self._start, self._stop, self.pos = offset, stop, 0
        self.final = stop == len(body)
        return (stop - offset) // _RELOAD_DIVISOR + 1

    def offset(self) -> int:
        """The byte offset of ``pos`` in the body."""
        text, pos = self.text, self.pos
        if pos == len(text):
            return self._stop
        # str.isascii() is O(1) on CPython; only non-ASCII windows need the re-encoding.
        return self._start + (pos if text.isascii() else len(text[:pos].encode("utf-8")))

    def room(self) -> int:
        """Make sure a value of up to ``max_value`` characters at ``pos`` lies wholly in the
        window; returns the work done."""
        if self.final or len(self.text) - self.pos >= self._max_value:
            return 0
        return self.load(self.offset())


class _Walker:
    def __init__(
        self, body: bytes, arrays: Collection[str], max_entries: int, max_value: int
    ) -> None:
        self._w = _Window(body, max_value)
        self._wanted = frozenset(arrays)
        self._max_entries = max_entries
        self._max_value = max_value
        self._entries = 0
        self._chunk_after = 0  # entry count from which chunks are tried again (see _chunk)
        self._backoff = 0
        self.answer = RpcAnswer()

    # --- tokens -------------------------------------------------------------------------------

    def _char(self) -> Steps[str]:
        """Skip whitespace; the next character ('' at the end of the body), not consumed."""
        w = self._w
        while True:
            w.pos = _WS.match(w.text, w.pos).end()  # type: ignore[union-attr]  # always matches
            if w.pos < len(w.text):
                return w.text[w.pos]
            if w.final:
                return ""
            # A run of whitespace longer than the window: go on in the next one.
            yield len(w.text) + w.load(w.offset())

    def _decode(self) -> tuple[Any, int]:
        """Decode the one JSON value at ``pos`` (whitespace already skipped); the value and the
        work done."""
        w = self._w
        cost = w.room()
        text, start = w.text, w.pos
        try:
            value, end = _SCAN(text, start)
        except (ValueError, RecursionError):
            if w.final:
                raise MalformedJson("body is not JSON") from None
            # The window held max_value characters from `start`: the value is not JSON, or
            # longer than that.
            raise MalformedJson(
                f"body is not JSON or holds a value over {self._max_value} characters"
            ) from None
        if end - start > self._max_value:
            # Decodable here only because the window happened to hold it: refuse it anyway, so
            # what is accepted does not depend on where windows fall.
            raise MalformedJson(f"body holds a value over {self._max_value} characters")
        w.pos = end
        return value, cost + end - start + VALUE_COST

    def _value(self) -> Steps[Any]:
        value, cost = self._decode()
        yield cost
        return value

    def _after(self, close: str) -> Steps[bool]:
        """Consume ``,`` (True: another item follows) or ``close`` (False)."""
        c = yield from self._char()
        self._w.pos += 1
        if c == close:
            return False
        if c != ",":
            raise MalformedJson("body is not JSON")
        return True

    # --- structure ----------------------------------------------------------------------------

    def _object(self, member: Callable[[str], Steps[None]]) -> Steps[None]:
        """Walk the object at ``pos`` (its ``{`` already seen), calling ``member`` on each key with
        ``pos`` at the value."""
        w = self._w
        w.pos += 1
        c = yield from self._char()
        if c == "}":
            w.pos += 1
            return
        members = 0
        while True:
            if c != '"':
                raise MalformedJson("body is not JSON")
            key = yield from self._value()
            members += 1
            if members > MAX_MEMBERS:
                raise WrongShape(f"an object with over {MAX_MEMBERS} members")
            if (yield from self._char()) != ":":
                raise MalformedJson("body is not JSON")
            w.pos += 1
            yield from self._char()
            yield from member(key)
            if not (yield from self._after("}")):
                return
            c = yield from self._char()

    def _chunk(self) -> tuple[list[Any] | None, int]:
        """Decode several array items at ``pos`` in one call of the C decoder, or none; the items
        (None if not done) and the work done.

        One call per item costs about twice what json.loads spends on it, and builds each key
        string anew where one call shares them (the decoder memoizes keys per call): ~1.7 times
        the memory.  So items are decoded in chunks of up to _CHUNK_CHARS characters, as the
        array ``[`` + text + ``]``, the text ending at a candidate boundary ``},{``.  A candidate
        may lie inside an item (a nested array of objects, a string); then the decode fails or
        stops short and the caller decodes one item alone.  When it consumes the whole text, the
        boundary was real: a JSON object is never a proper prefix of another value, so the text
        is exactly a run of whole items.
        """
        w = self._w
        cost = w.room()
        text, start = w.text, w.pos
        # Never longer than one value may be: items in a chunk obey the same limit.
        chunk_chars = min(_CHUNK_CHARS, self._max_value)
        close = text.rfind("}", start, min(len(text), start + chunk_chars))
        for _ in range(_CHUNK_LOOKS):
            if close <= start:
                break
            if _BOUNDARY.match(text, close + 1) is not None:
                source = "[" + text[start : close + 1] + "]"
                cost += len(source)
                try:
                    items, end = _SCAN(source, 0)
                except (ValueError, RecursionError):
                    items, end = None, 0
                if end == len(source):
                    w.pos = close + 1
                    self._backoff = 0
                    return items, cost + _CHUNK_ITEM_COST * len(items)
                break
            close = text.rfind("}", start, close)
        # A failed attempt costs up to a chunk of scanning: after each one in a row, items are
        # decoded alone for twice as long, so answers built to fail every attempt cannot make
        # the work grow more than a little.
        self._backoff = min(2 * self._backoff + 1, _MAX_BACKOFF)
        self._chunk_after = self._entries + self._backoff
        return None, cost

    def _array(self, name: str | None, into: list[dict[str, Any]] | None) -> Steps[None]:
        """Walk the array at ``pos`` (its ``[`` already seen) and count its items as entries.
        With ``into``, the items must be objects and are kept; otherwise they are only checked
        to be JSON (the items of an array nobody asked for)."""
        w = self._w
        w.pos += 1
        c = yield from self._char()
        if c == "]":
            w.pos += 1
            return
        pending = 0  # work not yet reported: yielding per item would cost more than the item
        while True:
            if into is not None and c != "{":
                if c in _NO_VALUE:
                    raise MalformedJson("body is not JSON")
                raise WrongShape(f"{name!r} is not a list of objects")
            # Chunks only while they cannot overshoot the limit: a chunk of n items has at
            # least 3n - 1 characters.
            chunk = None
            if (
                into is not None
                and self._entries >= self._chunk_after
                and self._max_entries - self._entries > _CHUNK_CHARS // 3 + 1
            ):
                chunk, cost = self._chunk()
                pending += cost
            if chunk is not None:
                assert into is not None
                if not all(type(item) is dict for item in chunk):
                    raise WrongShape(f"{name!r} is not a list of objects")
                self._entries += len(chunk)
                into.extend(chunk)
            else:
                self._entries += 1
                if self._entries > self._max_entries:
                    raise TooManyEntries()
                value, cost = self._decode()
                pending += cost
                if into is not None:
                    into.append(value)
            # Fast path: the separator and the next item's first character in this window.
            text = w.text
            found = _NEXT.match(text, w.pos)
            if found is not None and found.end() < len(text):
                w.pos = found.end()
                if found[1] == "]":
                    yield pending
                    return
                c = text[w.pos]
                if pending >= _REPORT:
                    yield pending
                    pending = 0
                continue
            # Slow path: whitespace across a window boundary, the end of the body, or garbage.
            yield pending
            pending = 0
            if not (yield from self._after("]")):
                return
            c = yield from self._char()

    def _result_member(self, key: str) -> Steps[None]:
        c = self._w.text[self._w.pos] if self._w.pos < len(self._w.text) else ""
        if key in self._wanted:
            if c in _NO_VALUE:
                raise MalformedJson("body is not JSON")
            if c != "[":
                raise WrongShape(f"{key!r} is not a list of objects")
            entries: list[dict[str, Any]] = []
            self.answer.arrays[key] = entries  # a repeated key replaces, as in json.loads
            yield from self._array(key, entries)
        elif c == "[":
            # An array nobody asked for (`out` from a wallet that ignored `out: false`): its
            # items cost the same work as entries, so they count as such.
            yield from self._array(None, None)
        else:
            yield from self._value()

    def _envelope_member(self, key: str) -> Steps[None]:
        w = self._w
        c = w.text[w.pos] if w.pos < len(w.text) else ""
        if key == "result" and c == "{":
            self.answer.arrays = {}
            self.answer.result_ok = True
            yield from self._object(self._result_member)
        elif key == "result":
            yield from self._value()
            self.answer.result_ok = False
        elif key == "error":
            self.answer.error = yield from self._value()
        else:
            yield from self._value()

    def walk(self) -> Steps[RpcAnswer]:
        yield self._w.start()
        c = yield from self._char()
        if c == "{":
            yield from self._object(self._envelope_member)
        elif c == "":
            raise MalformedJson("body is not JSON")
        else:
            yield from self._value()  # decoded only to tell JSON from garbage, as json.loads
            if (yield from self._char()) == "":
                raise WrongShape("body is not a JSON-RPC object")
        if (yield from self._char()) != "":
            raise MalformedJson("body is not JSON")  # trailing data, as json.loads refuses it
        return self.answer


def rpc_answer(
    body: bytes,
    arrays: Collection[str],
    max_entries: int,
    *,
    max_value: int = MAX_VALUE_CHARS,
) -> Steps[RpcAnswer]:
    """Walk the JSON-RPC answer ``body``; a generator yielding work done, returning its
    :class:`RpcAnswer`.  The arrays named in ``arrays``, members of ``result``, are decoded item
    by item (each must be an object); other members are decoded whole (at most ``max_value``
    characters each) and dropped, except arrays in ``result``, whose items are only checked.
    Items of all arrays in ``result`` count towards ``max_entries``.

    Raises :class:`MalformedJson`, :class:`WrongShape` or :class:`TooManyEntries`.  A JSON-RPC
    ``error`` is reported, not raised: it decides over ``result`` only if the walk gets to it (a
    wallet sends one or the other).
    """
    return _Walker(body, arrays, max_entries, max_value).walk()


async def run_sliced(reactor: Any, steps: Steps[T], budget: int = SLICE_COST) -> T:
    """Run ``steps`` to its end, letting ``reactor`` run a turn after each ``budget`` of work.

    Cancelling the returned coroutine's Deferred stops between two slices.
    """
    spent = 0
    try:
        while True:
            try:
                spent += next(steps)
            except StopIteration as done:
                result: T = done.value
                return result
            if spent >= budget:
                spent = 0
                # callLater(0): the reactor polls I/O and runs due calls before we go on.
                await deferLater(reactor, 0, lambda: None)
    finally:
        steps.close()
