"""The global suffix history: finished requests' tokens, one index per history key, bounded, shared, persistent.

One store belongs to a Model (and so to its server). Requests read the history of their own key only (the
server keys it by the request's API key): a token one key's requests wrote is never drafted for another's.
The memory bound holds over all keys together; past it, the oldest requests are forgotten first.

Thread-safe: the scheduler thread drafts from it while other threads add finished requests and the
saver writes it out. One lock; a lookup holds it for tens of microseconds.

Persistence (`path`): loaded at start, saved atomically (a temporary file renamed over the old one)
every `save_every` seconds when something changed, and at close. A file that is corrupt, truncated,
from another tokenizer or not a cache at all is reported in one line and ignored: the store starts empty.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidParameter
from .suffix_index import Match, SuffixIndex

log = logging.getLogger("verispec.suffix")

FORMAT = "verispec-suffix-history"
VERSION = 1
DEFAULT_MEMORY_MIB = 256.0
DEFAULT_SAVE_SECONDS = 300.0


def vocab_fingerprint(tokenizer, n_vocab: int) -> str:
    """What a saved history must match to be read back: the tokenizer's token strings, id for id."""
    try:
        strings = tokenizer.vocab_strings()
    except Exception:  # noqa: BLE001 - a tokenizer without its strings: the vocabulary size alone
        strings = []
    digest = hashlib.sha256("\x00".join(strings).encode("utf-8", "replace")).hexdigest()[:16]
    return f"{n_vocab}:{digest}"


def check_memory_limit(memory_mib: float) -> None:
    if not memory_mib > 0:
        raise InvalidParameter(f"the suffix history's memory limit must be > 0 MiB, got {memory_mib}", "suffix_memory")


class SuffixStore:
    def __init__(self, memory_mib: float = DEFAULT_MEMORY_MIB, path: str | os.PathLike | None = None,
                 fingerprint: str = "", n_vocab: int | None = None, save_every: float = DEFAULT_SAVE_SECONDS) -> None:
        check_memory_limit(memory_mib)
        self.limit_bytes = int(memory_mib * (1 << 20))
        self.fingerprint, self.n_vocab = fingerprint, n_vocab
        self.path = Path(path).expanduser() if path else None
        self.evicted = 0  # requests forgotten to stay within the limit
        self._histories: dict[str, SuffixIndex] = {}
        self._order: deque[str] = deque()  # the history key of every stored request, oldest first
        self._bytes = 0
        self._changes = 0  # adds and evictions since the last save
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saver: threading.Thread | None = None
        if self.path is not None:
            self._check_writable()
            self._load()
            if save_every > 0:
                self._saver = threading.Thread(target=self._save_every, args=(save_every,), name="verispec-suffix-saver",
                                               daemon=True)
                self._saver.start()

    # -- the history -------------------------------------------------------------------------------

    def add(self, key: str, tokens: Sequence[int]) -> None:
        """A finished request's tokens join `key`'s history; the oldest requests go while over the limit."""
        if len(tokens) < 2:
            return
        with self._lock:
            index = self._histories.setdefault(key, SuffixIndex())
            before = index.nbytes
            index.add_document(np.asarray(tokens, dtype=np.int32))
            self._bytes += index.nbytes - before
            self._order.append(key)
            self._changes += 1
            while self._bytes > self.limit_bytes and self._order:
                self._evict_oldest()

    def _evict_oldest(self) -> None:
        key = self._order.popleft()
        index = self._histories[key]
        before = index.nbytes
        index.evict_oldest()
        self._bytes += index.nbytes - before
        if not index.documents:
            self._bytes -= index.nbytes
            del self._histories[key]
        self.evicted += 1
        self._changes += 1

    def lookup(self, key: str, pattern: np.ndarray, depth: int) -> tuple[Match, np.ndarray] | None:
        """The longest match of the pattern's suffix in `key`'s history and the continuations of its latest
        occurrences (see SuffixIndex.match / continuations)."""
        with self._lock:
            index = self._histories.get(key)
            match = index.match(pattern) if index is not None else None
            if match is None:
                return None
            return match, index.continuations(match.ends, depth)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def requests(self) -> int:
        return len(self._order)

    def clear(self) -> None:
        with self._lock:
            self._histories.clear()
            self._order.clear()
            self._bytes = 0
            self._changes += 1

    # -- persistence -------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".suffix-probe-"):
                pass
        except OSError as exc:
            raise InvalidParameter(f"suffix cache {self.path}: cannot write to {folder} ({exc.strerror or exc})",
                                   "suffix_cache") from None
        if self.path.is_dir():
            raise InvalidParameter(f"suffix cache {self.path} is a directory; give a file path", "suffix_cache")

    def save(self) -> None:
        """Write the history to `path` atomically (nothing when there is no path)."""
        if self.path is None:
            return
        with self._lock:
            keys = sorted(self._histories)
            number = {key: i for i, key in enumerate(keys)}
            seen = dict.fromkeys(keys, 0)
            documents, owners = [], []
            for key in self._order:  # oldest first, as eviction will want them back
                documents.append(self._histories[key].document(seen[key]))
                owners.append(number[key])
                seen[key] += 1
            changes = self._changes
        meta = json.dumps({"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "keys": keys})
        arrays = {
            "meta": np.frombuffer(meta.encode(), dtype=np.uint8),
            "tokens": np.concatenate(documents).astype(np.int32) if documents else np.empty(0, np.int32),
            "lengths": np.array([len(d) for d in documents], dtype=np.int64),
            "owners": np.array(owners, dtype=np.int32),
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._changes -= changes

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            documents = self._read()
        except Exception as exc:  # noqa: BLE001 - any unreadable file: one line, start empty
            log.warning("suffix cache %s ignored (%s); starting with an empty history", self.path, _reason(exc))
            return
        for key, tokens in documents:
            self.add(key, tokens)
        self._changes = 0
        log.info("suffix cache %s: %d requests loaded (%.1f MiB)", self.path, len(self._order), self._bytes / (1 << 20))

    def _read(self) -> list[tuple[str, np.ndarray]]:
        with np.load(self.path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a verispec suffix history")
            if meta.get("version") != VERSION:
                raise ValueError(f"format version {meta.get('version')}, this verispec reads {VERSION}")
            if self.fingerprint and meta.get("fingerprint") != self.fingerprint:
                raise ValueError("written for another tokenizer")
            keys, tokens = list(meta["keys"]), data["tokens"]
            lengths, owners = data["lengths"], data["owners"]
        if len(lengths) != len(owners) or int(lengths.sum()) != len(tokens) or (lengths < 0).any():
            raise ValueError("its documents do not add up")
        if len(owners) and (owners.min() < 0 or owners.max() >= len(keys)):
            raise ValueError("a document has no history key")
        if len(tokens) and (tokens.min() < 0 or (self.n_vocab is not None and tokens.max() >= self.n_vocab)):
            raise ValueError("it holds token ids outside the vocabulary")
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        return [(str(keys[o]), tokens[bounds[i] : bounds[i + 1]]) for i, o in enumerate(owners.tolist())]

    def _save_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self._save_if_changed()

    def _save_if_changed(self) -> None:
        if not self._changes:
            return
        try:
            self.save()
        except Exception as exc:  # noqa: BLE001 - a failed save must not stop serving
            log.warning("suffix cache %s not saved (%s)", self.path, _reason(exc))

    def close(self) -> None:
        self._stop.set()
        if self._saver is not None:
            self._saver.join()
            self._saver = None
        if self.path is not None:
            self._save_if_changed()


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
