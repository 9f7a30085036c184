"""Domain corpora from installed Debian packages, as ``Doc(text, key, domain)``.

Domains (see :data:`DOMAINS`): 15 GCIDE subjects (senses whose subject label, e.g. ``(Zool.)``,
maps to the domain; the label is removed), ``computing`` (FOLDOC minus entries whose headword is
also a Jargon File headword), ``bible`` (KJV, a few verses per doc, key = book + chapter),
``c-api`` (man pages of sections 2 and 3 stripped of roff and cut into 400-800 character chunks,
key = page name). Also ``fortune:NAME`` (a fortune file) and ``jargon``. Files are read at run time;
nothing is copied. Parsed results are cached in memory, and slow parses also on disk as JSON under
``cache_dir()/corpora`` keyed by the source files' mtime and size.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from loramix.config import cache_dir
from loramix.errors import TrainingError
from loramix.train import dictd
from loramix.train.dictd import GCIDE_DOMAINS, MIN_CHARS, collapse, read_dictd, read_dictd_groups

__all__ = [
    "DOMAINS",
    "Doc",
    "build_benchmark",
    "load_domain",
    "load_source",
    "read_bible",
    "read_dictd",
    "read_fortunes",
    "read_man_pages",
    "strip_roff",
]

DOMAINS: list[str] = [*GCIDE_DOMAINS, "computing", "bible", "c-api"]
EXTRA_DOMAINS = ("jargon",)
FORTUNE_DIR = Path("/usr/share/games/fortunes")
MAN_DIR = Path("/usr/share/man")
BIBLE_BIN = Path("/usr/bin/bible")
C_API_SECTIONS = ("2", "2type", "3", "3const", "3head", "3type")  # not 3pm/3perl/3t (Perl, Tcl)
_CACHE_VERSION = 2
_CACHE_MIN_SECONDS = 1.0  # parses slower than this are cached on disk
_MAX_ENTRY_CHARS = 1000  # longer FOLDOC entries are cut into 400-800 character chunks

PACKAGES = {
    "gcide": "dict-gcide", "foldoc": "dict-foldoc", "jargon": "dict-jargon", "elements": "dict-elements",
    "vera": "dict-vera", "devil": "dict-devil", "wn": "dict-wn", "bible": "bible-kjv",
    "c-api": "manpages-dev", "fortune": "fortunes (or fortunes-min)",
}  # fmt: skip


@dataclass(frozen=True)
class Doc:
    """One text of a domain corpus; ``key`` groups texts that must stay on one side of a split."""

    text: str
    key: str
    domain: str


def _missing(what: str, path: Path, package: str) -> TrainingError:
    return TrainingError(
        f"{what}: corpus file {path} not found; install it with `apt-get install -y {package}`"
    )


# ----------------------------------------------------------------------------- disk cache


def _signature(paths: Iterable[Path]) -> list[list[object]]:
    sig: list[list[object]] = []
    for p in paths:
        st = p.stat()
        sig.append([str(p), st.st_mtime_ns, st.st_size])
    return sig


def _cached(name: str, sources: list[Path], build: Callable[[], list[tuple[str, str, str]]]) -> list[Doc]:
    """``build()`` rows as docs, read from ``cache_dir()/corpora/NAME.json`` when the sources are unchanged."""
    sig = _signature([*sources, Path(__file__), Path(dictd.__file__)])  # parser edits invalidate too
    path = cache_dir() / "corpora" / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") == _CACHE_VERSION and data.get("sources") == sig:
            return [Doc(t, k, d) for t, k, d in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    t0 = time.perf_counter()
    rows = build()
    if time.perf_counter() - t0 > _CACHE_MIN_SECONDS:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(
                json.dumps({"version": _CACHE_VERSION, "sources": sig, "rows": rows}), encoding="utf-8"
            )
            tmp.replace(path)
        except OSError:
            pass  # a read-only cache folder only costs speed
    return [Doc(t, k, d) for t, k, d in rows]


def _dictd_files(name: str) -> list[Path]:
    index, data = dictd.dictd_paths(name)
    if not index.exists() or not data.exists():
        raise _missing(
            f"dictd database {name!r}",
            index if not index.exists() else data,
            PACKAGES.get(name, f"dict-{name}"),
        )
    return [index, data]


# ----------------------------------------------------------------------------- dictd corpora


@lru_cache(maxsize=1)
def _gcide_by_domain() -> dict[str, list[Doc]]:
    docs = _cached(
        "gcide-senses", _dictd_files("gcide"), lambda: dictd.gcide_docs(read_dictd_groups("gcide"))
    )
    out: dict[str, list[Doc]] = {d: [] for d in GCIDE_DOMAINS}
    for doc in docs:
        out[doc.domain].append(doc)
    try:  # the chemical elements database joins chemistry
        for hws, raw in read_dictd_groups("elements"):
            title, body = dictd.elements_text(raw)
            text = f"{title}: {body}"
            if len(text) >= MIN_CHARS and not dictd.is_stub(body):
                out["chemistry"].append(Doc(text, hws[0].lower(), "chemistry"))
    except FileNotFoundError:
        pass
    return out


def _dictd_headwords(name: str) -> set[str]:
    return {hw.lower() for hw, _off, _len in dictd.read_index(dictd.dictd_paths(name)[0])}


@lru_cache(maxsize=1)
def _computing() -> list[Doc]:
    _dictd_files("foldoc")
    try:
        jargon = _dictd_headwords("jargon")
    except FileNotFoundError:
        jargon = set()
    docs: list[Doc] = []
    for hws, raw in read_dictd_groups("foldoc"):
        if any(h.lower() in jargon for h in hws):
            continue
        title, body = dictd.foldoc_text(raw)
        if title.lower() in jargon or not body or dictd.is_stub(body):
            continue
        parts = [body] if len(body) <= _MAX_ENTRY_CHARS else chunk_paragraphs([body])
        docs.extend(
            Doc(f"{title}: {p}", hws[0].lower(), "computing")
            for p in parts
            if len(p) + len(title) + 2 >= MIN_CHARS
        )
    return docs


def _dictd_domain(name: str, domain: str) -> list[Doc]:
    _dictd_files(name)
    docs = []
    for hws, raw in read_dictd_groups(name):
        text = dictd.entry_text(name, hws, raw)
        if len(text) >= MIN_CHARS:
            docs.append(Doc(text, hws[0].lower(), domain))
    return docs


# ----------------------------------------------------------------------------- fortunes


def read_fortunes(path: str | Path) -> list[str]:
    """Entries of a fortune file (separated by lines holding only ``%``), whitespace-collapsed."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [collapse(e) for e in re.split(r"^%[ \t]*$", text, flags=re.M) if e.strip()]


def _fortune_path(name: str) -> Path:
    p = Path(name)
    return p if p.is_file() else FORTUNE_DIR / name


def fortune_names() -> list[str]:
    """Installed fortune files (``fortune:NAME`` domains)."""
    if not FORTUNE_DIR.is_dir():
        return []
    return sorted(
        p.name for p in FORTUNE_DIR.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()
    )


def _fortune_docs(name: str) -> list[Doc]:
    path = _fortune_path(name)
    if not path.is_file():
        raise _missing(f"fortune file {name!r}", path, PACKAGES["fortune"])
    dom = f"fortune:{path.name}"
    return [Doc(t, f"{dom}:{i}", dom) for i, t in enumerate(read_fortunes(path)) if len(t) >= MIN_CHARS]


# ----------------------------------------------------------------------------- bible


def read_bible() -> list[tuple[str, int, int, str]]:
    """All KJV verses as ``(book, chapter, verse, text)``, read through ``/usr/bin/bible``."""
    if not BIBLE_BIN.exists():
        raise _missing("bible", BIBLE_BIN, PACKAGES["bible"])
    try:
        out = subprocess.run(
            [str(BIBLE_BIN), "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise TrainingError(f"bible: running {BIBLE_BIN} failed: {e}") from e
    verses = []
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$", line)
        if m:
            verses.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return verses


@lru_cache(maxsize=1)
def _bible_docs() -> list[Doc]:
    """A few consecutive verses per doc (at least 200 characters, never across chapters)."""
    chapters: dict[str, list[str]] = {}
    for book, ch, _v, text in read_bible():
        chapters.setdefault(f"{book} {ch}", []).append(text)
    docs: list[Doc] = []
    for key, verses in chapters.items():
        groups: list[str] = []
        cur = ""
        for v in verses:
            cur = f"{cur} {v}".strip()
            if len(cur) >= 200:
                groups.append(cur)
                cur = ""
        if cur:
            if len(cur) < MIN_CHARS and groups:
                groups[-1] += " " + cur
            else:
                groups.append(cur)
        docs.extend(Doc(g, key, "bible") for g in groups if len(g) >= MIN_CHARS)
    return docs


# ----------------------------------------------------------------------------- man pages

_ROFF_SPECIAL = {
    "em": "—", "en": "–", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "•",
    "co": "©", "rg": "®", "tm": "™", "mi": "-", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "mu": "×",
    ">=": "≥", "<=": "≤", "de": "°", "pc": "·", "hy": "-", "R": "®", "at": "@", "sh": "#", "lB": "[",
    "rB": "]", "lC": "{", "rC": "}", "or": "|", "ba": "|", "sl": "/", "->": "→", "<-": "←", "Fo": "«", "Fc": "»",
}  # fmt: skip
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d|\*(?:\[([^\]]*)\]|\((..)|(.))|\((..)|\[([^\]]*)\]"
    r"|n(?:\[[^\]]*\]|\(..|.)|\".*|[-e&c%|^:)/,!\s~0]|.)"
)
_DROP_SECTIONS = {"SEE ALSO", "COLOPHON", "ATTRIBUTES", "AUTHOR", "AUTHORS", "REPORTING BUGS", "COPYRIGHT"}
# fmt: off
_BREAK_MACROS = {"PP", "LP", "P", "TP", "IP", "HP", "sp", "SH", "SS", "TQ", "EX", "EE", "nf", "fi", "RS", "RE", "in"}
_SKIP_MACROS = {"TH", "UR", "UE", "MT", "ME", "DT", "PD", "UC", "TS", "TE", "Dd", "Dt", "Os", "Bl", "El", "Bd", "Ed"}
# fmt: on
_FONT_MACROS = {"B", "I", "SM", "SB", "R"}
_ALT_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}


def _roff_escape(m: re.Match[str]) -> str:
    s = m.group(0)
    name = m.group(1) or m.group(2) or m.group(3) or m.group(4) or m.group(5)
    if name is not None:
        return _ROFF_SPECIAL.get(name, "")
    if s in ("\\-", "\\e"):
        return "-" if s == "\\-" else "\\"
    if s in ("\\ ", "\\~", "\\0"):
        return " "
    return ""


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"?|\S+', rest)]


def strip_roff(source: str) -> list[str]:
    """Plain-text paragraphs of a man page (section headers and SEE ALSO/COLOPHON-like sections dropped)."""
    paras: list[str] = []
    cur: list[str] = []
    section, in_table, table_fmt = "", False, False

    def flush() -> None:
        if cur:
            text = collapse(" ".join(cur))
            if text and section not in _DROP_SECTIONS:
                paras.append(text)
            cur.clear()

    skip_to = ""
    source = re.sub(r"(?<!\\)\\\n", "", source)  # a trailing backslash continues the line
    for line in source.splitlines():
        if skip_to:
            if line.strip() == skip_to:
                skip_to = ""
            continue
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            if macro == "so":
                return []  # a link to another page
            if macro in ("SH", "SS"):
                flush()
                if macro == "SH":
                    section = collapse(" ".join(_roff_args(_ROFF_ESCAPE.sub(_roff_escape, rest)))).upper()
                continue
            if macro == "TS":
                flush()
                in_table, table_fmt = True, True
                continue
            if macro == "TE":
                flush()
                in_table = False
                continue
            if macro in ("de", "am", "ig"):
                skip_to = ".." if macro != "ig" or not rest.strip() else "." + rest.split()[0]
                continue
            if macro in _BREAK_MACROS:
                flush()
                continue
            if macro in _FONT_MACROS:
                cur.append(" ".join(_roff_args(_ROFF_ESCAPE.sub(_roff_escape, rest))))
            elif macro in _ALT_MACROS:
                cur.append("".join(_roff_args(_ROFF_ESCAPE.sub(_roff_escape, rest))))
            elif macro[:1].isupper() and macro not in _SKIP_MACROS:  # page-defined text macros (.ZN, .Fn)
                cur.append(" ".join(_roff_args(_ROFF_ESCAPE.sub(_roff_escape, rest))))
            continue  # lowercase requests: layout only
        if in_table:
            if table_fmt:
                table_fmt = not line.rstrip().endswith(".")
                continue
            line = line.replace("T{", " ").replace("T}", " ").replace("\t", " ")
        cur.append(_ROFF_ESCAPE.sub(_roff_escape, line))
    flush()
    return paras


def chunk_paragraphs(paras: list[str], lo: int = 400, hi: int = 800) -> list[str]:
    """Greedy chunks of ``lo``..``hi`` characters, cutting long paragraphs at sentence or word ends."""
    pieces: list[str] = []
    for p in paras:
        while len(p) > hi:
            cut = max(p.rfind(". ", lo // 2, hi), p.rfind("; ", lo // 2, hi))
            if cut < 0:
                cut = p.rfind(" ", lo // 2, hi)
            if cut < 0:
                cut = hi - 1
            pieces.append(p[: cut + 1].strip())
            p = p[cut + 1 :].strip()
        if p:
            pieces.append(p)
    chunks: list[str] = []
    cur = ""
    for piece in pieces:
        if cur and len(cur) + 1 + len(piece) > hi:
            chunks.append(cur)
            cur = piece
        else:
            cur = f"{cur} {piece}".strip()
        if len(cur) >= lo:
            chunks.append(cur)
            cur = ""
    if cur:
        if chunks and len(cur) < lo // 2:  # a short tail joins the last chunk (at most hi + lo/2)
            chunks[-1] += " " + cur
        else:
            chunks.append(cur)
    return chunks


def _man_files() -> list[Path]:
    files = []
    for sec in ("2", "3"):
        d = MAN_DIR / f"man{sec}"
        if d.is_dir():
            for p in d.iterdir():
                parts = p.name.split(".")
                if (
                    p.name.endswith(".gz")
                    and len(parts) >= 3
                    and parts[-2] in C_API_SECTIONS
                    and not p.is_symlink()
                ):
                    files.append(p)
    return sorted(files)


def read_man_pages() -> list[tuple[str, list[str]]]:
    """``(page name, paragraphs)`` of every real (non-link) C API man page of sections 2 and 3."""
    out = []
    for p in _man_files():
        try:
            src = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        paras = strip_roff(src)
        if paras:
            out.append((p.name.split(".")[0], paras))
    return out


def _c_api_rows() -> list[tuple[str, str, str]]:
    return [
        (chunk, name, "c-api")
        for name, paras in read_man_pages()
        for chunk in chunk_paragraphs(paras)
        if len(chunk) >= MIN_CHARS
    ]


@lru_cache(maxsize=1)
def _c_api() -> list[Doc]:
    files = _man_files()
    if not files:
        raise _missing("c-api", MAN_DIR / "man3", PACKAGES["c-api"])
    dirs = [MAN_DIR / "man2", MAN_DIR / "man3"]
    return _cached("c-api", [d for d in dirs if d.is_dir()], _c_api_rows)


# ----------------------------------------------------------------------------- domains

_DOMAIN_CACHE: dict[str, list[Doc]] = {}


def _known_domains() -> str:
    return ", ".join([*DOMAINS, *EXTRA_DOMAINS, "fortune:NAME"])


def _load_all(name: str) -> list[Doc]:
    if name in GCIDE_DOMAINS:
        return _gcide_by_domain()[name]
    if name == "computing":
        return _computing()
    if name == "bible":
        return _bible_docs()
    if name == "c-api":
        return _c_api()
    if name == "jargon":
        return _dictd_domain("jargon", "jargon")
    if name.startswith("fortune:"):
        return _fortune_docs(name.split(":", 1)[1])
    raise TrainingError(f"unknown domain {name!r}; expected one of {_known_domains()}")


def load_domain(name: str, limit: int | None = None, seed: int = 0) -> list[Doc]:
    """All docs of a domain (≥ 60 characters, deduplicated), or a seeded sample of ``limit`` of them."""
    if name not in _DOMAIN_CACHE:
        seen: set[str] = set()
        docs = []
        for d in _load_all(name):
            norm = _norm(d.text)
            if norm not in seen:
                seen.add(norm)
                docs.append(d)
        _DOMAIN_CACHE[name] = docs
    docs = _DOMAIN_CACHE[name]
    if limit is not None and limit < len(docs):
        return random.Random(f"{seed}:{name}").sample(docs, limit)
    return list(docs)


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


# ----------------------------------------------------------------------------- benchmark


def build_benchmark(
    domains: Iterable[str],
    per_domain_train: int,
    per_domain_test: int,
    seed: int = 0,
    max_per_key: int | None = 4,
) -> tuple[dict[str, list[Doc]], dict[str, list[Doc]]]:
    """Train/test docs per domain, split by key, deduplicated across domains, deterministic in ``seed``.

    Deduplication: a text whose normalised form occurs in two domains is dropped from all of them
    (it cannot be routed correctly). A key (headword) found in several domains is kept only in the
    domain holding most docs under it (ties: the domain with fewer docs overall, then the first
    listed), so a headword never appears in two domains and hence never on both sides of the split.
    Within a domain, keys are shuffled and given to the test or train side, whichever is less full
    relative to its cap, taking at most ``max_per_key`` docs per key (spreads e.g. man pages).
    """
    names = list(dict.fromkeys(domains))
    if per_domain_train < 0 or per_domain_test < 0:
        raise TrainingError(
            f"per-domain sizes must be >= 0, got train={per_domain_train} test={per_domain_test}"
        )
    all_docs = {d: load_domain(d) for d in names}
    text_domains: dict[str, set[str]] = defaultdict(set)
    for d, docs in all_docs.items():
        for doc in docs:
            text_domains[_norm(doc.text)].add(d)
    kept = {d: [x for x in docs if len(text_domains[_norm(x.text)]) == 1] for d, docs in all_docs.items()}
    key_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for d, docs in kept.items():
        for doc in docs:
            key_counts[doc.key.lower()][d] += 1
    order = {d: i for i, d in enumerate(names)}
    owner = {k: min(c, key=lambda d: (-c[d], len(kept[d]), order[d])) for k, c in key_counts.items()}
    train: dict[str, list[Doc]] = {}
    test: dict[str, list[Doc]] = {}
    for d in names:
        groups: dict[str, list[Doc]] = defaultdict(list)
        for doc in kept[d]:
            if owner[doc.key.lower()] == d:
                groups[doc.key.lower()].append(doc)
        rng = random.Random(f"{seed}:{d}")
        keys = sorted(groups)
        rng.shuffle(keys)
        tr: list[Doc] = []
        te: list[Doc] = []
        for k in keys:
            group = sorted(groups[k], key=lambda x: x.text)
            rng.shuffle(group)
            group = group[:max_per_key] if max_per_key else group
            te_fill = len(te) / per_domain_test if per_domain_test else 1.0
            tr_fill = len(tr) / per_domain_train if per_domain_train else 1.0
            if te_fill >= 1.0 and tr_fill >= 1.0:
                break
            (te if te_fill <= tr_fill else tr).extend(group)
        train[d], test[d] = tr[:per_domain_train], te[:per_domain_test]
    return train, test


# ----------------------------------------------------------------------------- --data SOURCE


def _installed_dictd() -> list[str]:
    if not dictd.DICTD_DIR.is_dir():
        return []
    return sorted(p.name[: -len(".index")] for p in dictd.DICTD_DIR.glob("*.index"))


def _accepted() -> str:
    dbs = ", ".join(_installed_dictd()) or "none installed"
    fort = ", ".join(fortune_names()[:8]) or "none installed"
    return (
        "a .txt file (blank-line-separated paragraphs, else lines), a .jsonl file (field 'text', or "
        "'input' + 'output'/'target'), a fortune file path, a domain "
        f"({_known_domains()}), dictd:NAME (installed: {dbs}), or fortune:NAME (installed: {fort}, ...)"
    )


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    if re.search(r"\n[ \t]*\n", text.strip()):
        return [collapse(p) for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


def jsonl_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """Each JSONL object with its text: field ``text``, or ``input`` + ``output``/``target`` joined."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise TrainingError(f"{path}:{i}: not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise TrainingError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            if isinstance(row.get("text"), str):
                yield row, row["text"]
            elif isinstance(row.get("input"), str) and isinstance(row.get("output", row.get("target")), str):
                yield row, f"{row['input']}\n{row.get('output', row.get('target'))}"
            else:
                raise TrainingError(
                    f"{path}:{i}: expected a string field 'text', or 'input' and 'output'/'target'; got keys {sorted(row)}"
                )


def _read_jsonl(path: Path) -> list[str]:
    return [text for _, text in jsonl_rows(path)]


def _dictd_source(name: str) -> list[str]:
    index, data = dictd.dictd_paths(name)
    if not index.exists() or not data.exists():
        raise TrainingError(
            f"dictd:{name}: database not found at {index}; install it with "
            f"`apt-get install -y {PACKAGES.get(name, 'dict-' + name)}`; installed: "
            f"{', '.join(_installed_dictd()) or 'none'}"
        )

    def build() -> list[tuple[str, str, str]]:
        rows = (
            (dictd.entry_text(index.stem, hws, raw), hws[0].lower()) for hws, raw in read_dictd_groups(index)
        )
        return [(t, k, f"dictd:{index.stem}") for t, k in rows if len(t) >= MIN_CHARS]

    return [d.text for d in _cached(f"dictd-{index.stem}", [index, data], build)]


def load_source(spec: str, limit: int | None = None) -> list[str]:
    """Texts for ``--data SOURCE``: a .txt/.jsonl/fortune file, a domain, ``dictd:NAME`` or ``fortune:NAME``."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".ndjson"):
            texts = _read_jsonl(path)
        elif path.suffix == ".txt":
            texts = _read_txt(path)
        elif re.search(r"^%[ \t]*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M):
            texts = read_fortunes(path)
        else:
            texts = _read_txt(path)
    elif spec.startswith("dictd:"):
        texts = _dictd_source(spec.split(":", 1)[1])
    elif spec in DOMAINS or spec in EXTRA_DOMAINS or spec.startswith("fortune:"):
        texts = [d.text for d in load_domain(spec, limit=limit)]
    elif spec in _installed_dictd():
        texts = _dictd_source(spec)
    elif path.suffix or "/" in spec:
        raise TrainingError(f"--data {spec!r}: no such file; expected {_accepted()}")
    else:
        raise TrainingError(f"--data {spec!r}: unknown source; expected {_accepted()}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TrainingError(f"--data {spec!r}: no texts found")
    return texts[:limit] if limit is not None else texts
