"""Readers and markup strippers for dictd databases (GCIDE, FOLDOC, Jargon, elements, ...).

A dictd database is ``NAME.index`` (``headword TAB offset TAB length``, numbers in base 64 over
``A-Za-z0-9+/``) plus ``NAME.dict.dz`` (gzip; offsets address the uncompressed bytes).

GCIDE entries are split into senses (head definition, numbered ``1.`` senses, lettered ``(a)``
senses carrying a label, and ``{Sub entry}`` blocks). A subject label such as ``(Zool.)`` at the
start of a sense gives the sense its domain; the label is removed from the text. The functions here
return plain ``(text, key, domain)`` tuples; :mod:`loramix.train.corpora` turns them into ``Doc``.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

DICTD_DIR = Path("/usr/share/dictd")
MIN_CHARS = 60

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def b64_decode(s: str) -> int:
    """Decode a dictd base-64 number (``A`` = 0, most significant digit first)."""
    n = 0
    for c in s:
        try:
            n = n * 64 + _B64_VALUE[c]
        except KeyError:
            raise ValueError(f"invalid dictd base-64 digit {c!r} in {s!r}") from None
    return n


def dictd_paths(name_or_index_path: str | Path) -> tuple[Path, Path]:
    """``(index, data)`` paths for a database name (``gcide``) or an ``.index`` path."""
    p = Path(name_or_index_path)
    index = p if p.suffix == ".index" else DICTD_DIR / f"{p.name}.index"
    stem = index.with_suffix("")
    for data in (stem.with_name(stem.name + ".dict.dz"), stem.with_name(stem.name + ".dict")):
        if data.exists():
            return index, data
    return index, stem.with_name(stem.name + ".dict.dz")


def _is_meta(headword: str) -> bool:
    return headword.startswith(("00-database", "00database"))


def read_index(index_path: Path) -> list[tuple[str, int, int]]:
    """``(headword, offset, length)`` for every non-metadata line of a dictd index."""
    rows = []
    with open(index_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or _is_meta(parts[0]):
                continue
            rows.append((parts[0], b64_decode(parts[1]), b64_decode(parts[2])))
    return rows


def _read_data(data_path: Path) -> bytes:
    if data_path.suffix == ".dz":
        with gzip.open(data_path, "rb") as f:
            return f.read()
    return data_path.read_bytes()


def read_dictd_groups(name_or_index_path: str | Path) -> Iterator[tuple[list[str], str]]:
    """``(headwords, raw_entry)`` per distinct entry; all index headwords pointing at it, in index order."""
    index, data_path = dictd_paths(name_or_index_path)
    if not index.exists() or not data_path.exists():
        raise FileNotFoundError(f"dictd database not found: {index} / {data_path}")
    groups: dict[tuple[int, int], list[str]] = {}
    for hw, off, length in read_index(index):
        groups.setdefault((off, length), []).append(hw)
    data = _read_data(data_path)
    for (off, length), hws in groups.items():
        yield hws, data[off : off + length].decode("utf-8", errors="replace").replace("\ufffd", "")


def read_dictd(name_or_index_path: str | Path, unique: bool = True) -> Iterator[tuple[str, str]]:
    """``(headword, raw_entry)`` for each entry; ``unique`` yields an entry shared by several headwords once."""
    for hws, raw in read_dictd_groups(name_or_index_path):
        if unique:
            yield hws[0], raw
        else:
            for hw in hws:
                yield hw, raw


def dictd_lookup(name_or_index_path: str | Path, headword: str) -> list[str]:
    """Raw entries whose index headword equals ``headword`` (case-insensitive), in index order."""
    index, data_path = dictd_paths(name_or_index_path)
    want = headword.lower()
    spans = list(dict.fromkeys((o, n) for hw, o, n in read_index(index) if hw.lower() == want))
    if not spans:
        return []
    data = _read_data(data_path)
    return [data[o : o + n].decode("utf-8", errors="replace") for o, n in spans]


# ----------------------------------------------------------------------------- shared cleaning

_WS = re.compile(r"\s+")
_BRACES = re.compile(r"\{([^{}]*)\}")
_BRACKET_INNER = re.compile(r"\[[^\[\]]*\]")
_AUTHOR = re.compile(r"--(?=[A-Z])[^\n)]*")  # "--Milton." citation to the end of the line
_STUB = re.compile(r"^(see( also| under)?|same as|alt\. of|cf\.|variant of|pl\. of|plural of)\b", re.I)


def collapse(text: str) -> str:
    """Collapse whitespace runs to one space and tidy spaces before punctuation."""
    text = _WS.sub(" ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def strip_brackets(text: str) -> str:
    """Remove ``[...]`` groups, innermost first (etymologies, ``[1913 Webster]``, ``[Obs.]``, ``[PJC]``)."""
    while True:
        new = _BRACKET_INNER.sub(" ", text)
        if new == text:
            return text.replace("[", " ").replace("]", " ")
        text = new


def strip_braces(text: str) -> str:
    """``{cross ref}`` -> ``cross ref``."""
    while True:
        new = _BRACES.sub(r"\1", text)
        if new == text:
            return new.replace("{", "").replace("}", "")
        text = new


def is_stub(body: str) -> bool:
    """A ``See {X}``-style pointer with no content of its own."""
    return bool(_STUB.match(body)) and len(body) < 120


# ----------------------------------------------------------------------------- GCIDE

_NAMED = {
    "ae": "ae", "AE": "Ae", "oe": "oe", "OE": "Oe", "thorn": "th", "THORN": "Th", "eth": "th",
    "ETH": "Th", "yogh": "y", "deg": "°", "root": "√", "sect": "§", "ng": "ng", "th": "th",
    "imac": "i", "aum": "", "asl": "", "add": "", "udd": "", "cre": "", "frac12": "1/2",
    "frac14": "1/4", "frac34": "3/4", "frac13": "1/3", "frac23": "2/3", "frac18": "1/8",
}  # fmt: skip
_ENTITY = re.compile(
    r"\[(?:([\"'`=~^.,\-*/]{1,2})([A-Za-z]{1,2})|([A-Za-z]{1,2})([\^*])|(" + "|".join(_NAMED) + r"))\]"
)


def _entity(m: re.Match[str]) -> str:
    if m.group(2):
        return m.group(2)
    if m.group(3):
        return m.group(3)
    return _NAMED[m.group(5)]


def gcide_entities(text: str) -> str:
    """Turn GCIDE character codes (``Zo["o]l``, ``cnid[ae]``, ``[=a]``) into letters."""
    return _ENTITY.sub(_entity, text)


# Subject labels: words of a label inside parentheses -> benchmark domain.
LABEL_DOMAINS: dict[str, str] = {
    "zool": "zoology", "zoology": "zoology",
    "bot": "botany", "botany": "botany",
    "chem": "chemistry", "chemistry": "chemistry",
    "med": "medicine", "medicine": "medicine", "anat": "medicine", "anatomy": "medicine",
    "law": "law",
    "naut": "nautical", "nautical": "nautical",
    "geol": "geology", "geology": "geology", "min": "geology", "miner": "geology", "mineralogy": "geology",
    "physics": "physics", "mech": "physics", "mechanics": "physics",
    "math": "mathematics", "mathematics": "mathematics",
    "mus": "music", "music": "music",
    "arch": "architecture", "architecture": "architecture",
    "mil": "military", "military": "military",
    "eccl": "religion", "eccles": "religion", "theol": "religion", "theology": "religion",
    "gram": "grammar", "grammar": "grammar", "rhet": "grammar", "rhetoric": "grammar",
    "her": "heraldry", "heraldry": "heraldry",
}  # fmt: skip
# Words that qualify a subject without changing it: (Eccl. Hist.), (Law Dict.), (Eng. Law), (Mil. U. S.).
_QUALIFIERS = frozenset(
    {"hist", "antiq", "dict", "drill", "tactics", "eng", "scot", "rom", "civil", "u", "s"}
)
_SEPARATORS = frozenset({"and", "or"})
GCIDE_DOMAINS = (
    "zoology", "botany", "chemistry", "medicine", "law", "nautical", "geology", "physics",
    "mathematics", "music", "architecture", "military", "religion", "grammar", "heraldry",
)  # fmt: skip

_ANY_LABEL = re.compile(
    r"\([^()\n]{0,15}?(?:Zo|Bot|Chem|Med|Anat|Law|Naut|Geol|Min|Phys|Mech|Math|Mus|Arch|Mil|Eccl|Theol|Gram|Rhet|Her)"
)
_LABEL = re.compile(r"\(([A-Z][^()\n]{0,40})\)")
# label-like parentheses anywhere in a body: (Zool.), (Eng. Law), (Physiol. & Med.), (Law), (Music)
_LABEL_ANYWHERE = re.compile(
    r"\s*\((?:[A-Z][a-z]{1,12}\.?(?:\s*(?:&|,|and|or)?\s*[A-Z][a-z]{1,12}\.?){0,3})\)(?=[\s,.;:]|$)"
)
_POS_WORDS = frozenset(
    {"n", "a", "v", "t", "i", "adv", "adj", "pl", "sing", "imp", "p", "pr", "vb", "prep", "conj", "interj",
     "pron", "superl", "compar", "obs", "r", "prop"}
)  # fmt: skip


def label_domain(label: str) -> str | None:
    """Domain for a label's text (``Zool.`` -> ``zoology``); ``None`` if unknown or ambiguous."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", gcide_entities(label))]
    domains = set()
    for w in words:
        if w in _SEPARATORS or w in _QUALIFIERS:
            continue
        d = LABEL_DOMAINS.get(w)
        if d is None:
            return None
        domains.add(d)
    return domains.pop() if len(domains) == 1 else None


def _label_ok(pre: str) -> bool:
    """True if the text before a label holds only part-of-speech tokens and sense markers."""
    if len(pre) > 40 or re.search(r"[A-Z]", pre):
        return False
    return all(w in _POS_WORDS or len(w) == 1 for w in re.findall(r"[a-z]+", pre))


_HEAD = re.compile(r"^([^\s\[\-][^\\\n]*?)\s*\\[^\\\n]*\\")
_POS_PREFIX = re.compile(
    r"^[\s,;.]*(?:(?:n|a|v|t|i|adv|adj|pl|prop|sing|imp|p|pr|vb|prep|conj|interj|pron|superl|compar)\.[\s,;&]*)+"
)
_MORE_HEADS = re.compile(r"^\s*[,;]?\s*(?:or\s+)?[^,;\\\n\[\]]{1,60}?\s*\\[^\\\n]*\\")
_PRON_PAREN = re.compile(r"^\s*\([^()]*\)")
_NUMBERED = re.compile(r"^ {1,5}\d{1,2}\.\s")
_LETTERED = re.compile(r"^ {1,10}\([a-z]\)\s")
_SUBENTRY = re.compile(r"^ {2,4}\{")
_NOTE = re.compile(r"^ {2,6}Note:")
_DROP_BLOCK = re.compile(r"^ {2,6}(Syn|Usage|Antonyms?|Specifically|Hence|Sources?)\s*:")
# derived forms "-- {Bar"ra*trous*ly}, adv." and "-- {A*ba"sic} (a*ba"sik), a."
_DERIVED = re.compile(
    r"--\s*(?:\{[^{}]*[\"*`][^{}]*\}(?:\s*\([^()]*\))?[\s,;]*(?:or\s+)?)+"
    r"(?:(?:n|a|adj|adv|v|t|i|pl|p|pr|imp)\.[\s,&]*)*"
)
_PRON_GROUP = re.compile(r"\\[^\\\n]{1,60}\\")  # a leftover \Pro*nun"ci*a`tion\ group
_PRON_MARK = re.compile(r"(?<=\w)[`*\"](?=\w)")  # an`e*mo"ne -> anemone
# "[1913 Webster] Noetic": a stray fragment of the next headword after a source tag
_TAG_TAIL = re.compile(r"(\[[^\[\]\n]*(?:Webster|PJC|WordNet)[^\[\]\n]*\])[ \t]+\S.*$", re.M)
_SUBTERMS = re.compile(r"^\s*((?:\{[^{}]*\}[\s,;]*(?:or\s+|and\s+)?)+)")


def _clean_word(word: str) -> str:
    return collapse(re.sub(r"[\"*`|]", "", gcide_entities(strip_braces(word))))


def _segments(raw: str) -> Iterator[tuple[str, int, list[str]]]:
    """Split one GCIDE entry into ``(kind, marker_indent, lines)``; kind: head/num/let/sub/note/drop."""
    kind, indent = "", 0
    lines: list[str] = []
    prev_blank, in_quote = True, False
    raw = _TAG_TAIL.sub(r"\1", raw)
    for line in raw.split("\n"):
        if not line.strip():
            prev_blank = True
            continue
        ind = len(line) - len(line.lstrip(" "))
        new: str | None = None
        if ind == 0 and line[0] not in "[-\\" and "\\" in line:
            new = "head"
        elif _NUMBERED.match(line):
            new = "num"
        elif _LETTERED.match(line):
            new = "let"
        elif _NOTE.match(line):
            new = "note"
        elif _DROP_BLOCK.match(line):
            new = "drop"
        elif prev_blank and _SUBENTRY.match(line):
            new = "sub"
        if new is not None:
            if lines:
                yield kind, indent, lines
            kind, indent, lines, in_quote = new, ind, [line], False
        elif (prev_blank or in_quote) and ind >= indent + (9 if kind == "note" else 6):
            in_quote = True  # an indented literary quotation: dropped
        elif line.lstrip().startswith("--"):
            in_quote = False  # derived forms "-- {Irk"some*ly}, adv."
        else:
            in_quote = False
            lines.append(line)
        prev_blank = False
    if lines:
        yield kind, indent, lines


def _clean_body(text: str) -> str:
    text = gcide_entities(text)
    text = strip_brackets(text)
    text = _AUTHOR.sub(" ", text)
    text = _DERIVED.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _PRON_MARK.sub("", text)
    text = strip_braces(text)
    text = _LABEL_ANYWHERE.sub(" ", text)
    text = _PRON_GROUP.sub(" ", text)
    text = re.sub(r"\(\s*\)", " ", text)
    text = re.sub(r"\s--\s*$", "", collapse(text))
    text = re.sub(r"(?<=[.;])\s+(?:AS|WN|PJC)$", "", text)
    return text.lstrip(",.;: ")


def gcide_senses(
    raw: str, headword: str = "", labelled_only: bool = False
) -> list[tuple[str, str, str | None, str]]:
    """Senses of one GCIDE entry as ``(title, key, domain|None, body)``; labels removed from bodies.

    ``labelled_only`` leaves the body of senses without a known domain empty (faster)."""
    out: list[tuple[str, str, str | None, str]] = []
    word = headword
    head_label: str | None = None
    parent_label: str | None = None
    for kind, _indent, lines in _segments(raw):
        if kind == "drop":
            continue
        text = "\n".join(lines)
        title = word
        if kind == "head":
            m = _HEAD.match(text)
            if m:
                word = title = _clean_word(m.group(1)) or headword
                text = text[m.end() :]
                while mm := _MORE_HEADS.match(text):  # "Archimage \..\, Archimagus \..\, n."
                    text = text[mm.end() :]
                pm = _PRON_PAREN.match(text)
                if (
                    pm
                    and not label_domain(pm.group(0).strip()[1:-1])
                    and not _LABEL.fullmatch(pm.group(0).strip())
                ):
                    text = text[pm.end() :]
            head_label = parent_label = None
        elif kind == "note":
            if out and out[-1][0] == word and (out[-1][2] or not labelled_only):  # attach to the main sense
                t, k, d, b = out[-1]
                out[-1] = (t, k, d, collapse(b + " " + _clean_body(text.split("Note:", 1)[1])))
            continue
        elif kind == "sub":
            sm = _SUBTERMS.match(text)
            if not sm:
                continue
            terms = re.findall(r"\{([^{}]*)\}", sm.group(1))
            title = _clean_word(terms[0]) if terms else word
            text = text[sm.end() :]
        else:
            text = re.sub(r"^\s*(\d{1,2}\.|\([a-z]\))\s*", "", text)
        text = strip_brackets(gcide_entities(text))
        label: str | None = None
        has_label = False
        lm = _LABEL.search(text)
        if (
            lm
            and _label_ok(text[: lm.start()])
            and (label_domain(lm.group(1)) or _LABEL_ANYWHERE.fullmatch(lm.group(0)))
        ):
            has_label = True
            label = label_domain(lm.group(1))
            text = text[lm.end() :]
        elif kind in ("num", "let"):
            label = parent_label if kind == "let" else head_label
            has_label = label is not None
        if kind == "head":
            head_label = parent_label = label
        elif kind in ("num", "sub"):
            parent_label = label  # lettered senses below inherit it
        if not has_label:
            label = None
        text = _POS_PREFIX.sub("", text)  # "n." before, or "pl." after, the label
        body = "" if labelled_only and label is None else _clean_body(text)
        out.append((title or headword, word.lower() or headword.lower(), label, body))
    return out


def gcide_docs(groups: Iterator[tuple[list[str], str]]) -> list[tuple[str, str, str]]:
    """``(text, key, domain)`` for every labelled GCIDE sense in a known domain, cleaned and filtered."""
    rows = []
    for hws, raw in groups:
        if not _ANY_LABEL.search(raw):
            continue
        for title, key, domain, body in gcide_senses(raw, hws[0], labelled_only=True):
            if domain is None or is_stub(body):
                continue
            text = f"{title}: {body}"
            if len(text) >= MIN_CHARS and len(body) >= 30:
                rows.append((text, key, domain))
    return rows


def gcide_entry_text(raw: str, headword: str = "") -> str:
    """One GCIDE entry as plain text (all senses, labels removed), for ``dictd:gcide``."""
    senses = [(t, b) for t, _k, _d, b in gcide_senses(raw, headword) if b and not is_stub(b)]
    if not senses:
        return ""
    title = senses[0][0]
    parts = [b if t == title else f"{t}: {b}" for t, b in senses]
    return f"{title}: " + " ".join(parts)


# ----------------------------------------------------------------------------- FOLDOC, Jargon, others

_URL = re.compile(r"\{?\(?(?:https?|ftp|news|mailto|telnet|gopher):[^\s})]*\)?\}?")
_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)")
_SUBJECT_TAG = re.compile(r"<[^<>\n]{1,60}>")


def _split_heading(raw: str) -> tuple[list[str], str]:
    """Heading lines (column 0, before the first blank line) and the indented body."""
    head, _sep, body = raw.partition("\n\n")
    if not _sep:
        lines = raw.split("\n")
        return lines[:1], "\n".join(lines[1:])
    return [h for h in head.split("\n") if h.strip()], body


# "Usenet newsgroup: {news:comp.lang.c}." once the address is gone
_DANGLING = re.compile(r"(?:^|(?<=[.;)]))\s*[A-Z][\w/ -]{0,30}:[\s,;]*(?:\.|$)", re.M)
_SLASH_PRON = re.compile(r"^(?:(?:\s*(?:,|or|rarely|also|and|;))*\s*/[^/\n]{1,50}/)+")


def foldoc_text(raw: str) -> tuple[str, str]:
    """``(title, cleaned body)`` of a FOLDOC entry: subject tags, URLs, citations, dates removed."""
    heads, body = _split_heading(raw)
    title = heads[0].strip() if heads else ""
    body = _SUBJECT_TAG.sub(" ", _DATE.sub(" ", _URL.sub(" ", body)))
    body = _SLASH_PRON.sub(" ", body.lstrip())
    body = strip_brackets(body)
    body = _DATE.sub(" ", strip_braces(body))  # again: some dates hold a stray brace, "(2001}-02-03)"
    body = _DANGLING.sub(" ", body)
    body = re.sub(r"\(\s*\)", " ", body)
    return title, re.sub(r"(?<=\w)\.\.(?=\s|$)", ".", collapse(body))


def jargon_text(raw: str) -> tuple[str, str]:
    """``(title, cleaned body)`` of a Jargon File entry (part-of-speech line dropped)."""
    heads, body = _split_heading(raw)
    title = heads[0].strip() if heads else ""
    body = re.sub(r"^\s*(?:[a-z]{1,6}\.(?:,\s*)?)+\s*$", " ", body, count=1, flags=re.M)
    body = _SLASH_PRON.sub(" ", body.lstrip())
    body = strip_braces(strip_brackets(_URL.sub(" ", body)))
    body = body.replace("\u201c", '"').replace("\u201d", '"')
    return title, collapse(body)


def elements_text(raw: str) -> tuple[str, str]:
    """``(title, cleaned body)`` of a dict-elements entry (symbol / number / weight lines dropped)."""
    lines = raw.strip().split("\n")
    title = lines[0].strip().capitalize() if lines else ""
    keep = [ln for ln in lines[1:] if not re.match(r"\s*(Symbol|Atomic number|At\w*ic weight)\s*:", ln, re.I)]
    return title, collapse(strip_braces("\n".join(keep)))


def generic_text(raw: str, headword: str) -> tuple[str, str]:
    """``(title, cleaned body)`` for any other dictd database."""
    heads, body = _split_heading(raw)
    if not body.strip():
        body = "\n".join(heads[1:])
    title = heads[0].strip() if heads else headword
    return title, collapse(strip_braces(_URL.sub(" ", body)))


def entry_text(name: str, headwords: list[str], raw: str) -> str:
    """A dictd entry of database ``name`` as ``"Title: body"`` ("" for a stub)."""
    if name == "gcide":
        return gcide_entry_text(raw, headwords[0])
    cleaner = {"foldoc": foldoc_text, "jargon": jargon_text, "elements": elements_text}.get(name)
    title, body = cleaner(raw) if cleaner else generic_text(raw, headwords[0])
    if not body or is_stub(body):
        return ""
    return f"{title}: {body}"
