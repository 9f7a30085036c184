"""Tests of loramix.train.corpora / dictd on the Debian corpora installed on this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loramix.errors import TrainingError
from loramix.train import corpora, dictd
from loramix.train.corpora import DOMAINS, Doc, build_benchmark, load_domain, load_source

DICTD = Path("/usr/share/dictd")


def _need_dictd(name: str) -> None:
    if not (DICTD / f"{name}.index").exists():
        pytest.skip(f"dictd database {name!r} not installed (apt-get install -y dict-{name})")


def _need_all() -> None:
    for name in ("gcide", "foldoc", "jargon"):
        _need_dictd(name)
    if not corpora.BIBLE_BIN.exists():
        pytest.skip("bible-kjv not installed (/usr/bin/bible missing)")
    if not (corpora.MAN_DIR / "man3").is_dir():
        pytest.skip("manpages-dev not installed (/usr/share/man/man3 missing)")


_norm = corpora._norm
_GCIDE_DOMAINS = DOMAINS[:15]


# ----------------------------------------------------------------------------- dictd format


@pytest.mark.parametrize(
    ("s", "n"),
    [
        ("A", 0),
        ("B", 1),
        ("Z", 25),
        ("a", 26),
        ("0", 52),
        ("+", 62),
        ("/", 63),
        ("BA", 64),
        ("BAA", 4096),
        ("Hv", 7 * 64 + 47),
    ],
)
def test_b64_decode(s: str, n: int) -> None:
    assert dictd.b64_decode(s) == n


def test_b64_decode_rejects_bad_digit() -> None:
    with pytest.raises(ValueError, match="base-64"):
        dictd.b64_decode("A=")


def test_read_known_entries() -> None:
    _need_dictd("gcide")
    entries = dictd.dictd_lookup("gcide", "acorn")
    assert any(e.startswith('Acorn \\A"corn\\') and "fruit of the oak" in e for e in entries)
    first = next(dictd.read_dictd("gcide"))
    assert not first[0].startswith("00")


def test_read_dictd_skips_metadata_and_matches_index() -> None:
    _need_dictd("elements")
    rows = list(dictd.read_dictd("elements"))
    heads = [h for h, _ in rows]
    assert not any(h.startswith(("00-database", "00database")) for h in heads)
    entry = dict(rows)["yttrium"]
    assert entry.startswith("yttrium") and "Atomic number: 39" in entry


def test_read_fortunes(tmp_path: Path) -> None:
    f = tmp_path / "quips"
    f.write_text("First one\nspans lines.\n%\nSecond one.\n%\n")
    assert corpora.read_fortunes(f) == ["First one spans lines.", "Second one."]


# ----------------------------------------------------------------------------- cleaning units


def test_gcide_sense_split_and_label_removal() -> None:
    raw = (
        'Acorn \\A"corn\\, n. [AS. [ae]cern, fr. [ae]cer field. See\n   {Acre}.]\n'
        "   1. The fruit of the oak, being an oval nut growing in a woody\n      cup or cupule.\n      [1913 Webster]\n\n"
        "   2. (Naut.) A cone-shaped piece of wood on the point of the\n      spindle above the vane, on the mast-head.\n"
        "      [1913 Webster]\n\n   3. (Zool.) See {Acorn-shell}.\n      [1913 Webster]\n\n"
        "   {Acorn cup} (Bot.), the involucre or cup in which the acorn is\n      fixed. --Milton.\n      [1913 Webster]\n"
    )
    senses = dictd.gcide_senses(raw, "Acorn")
    by_domain = {d: (t, b) for t, _k, d, b in senses if d}
    assert by_domain["nautical"] == (
        "Acorn",
        "A cone-shaped piece of wood on the point of the spindle above the vane, on the mast-head.",
    )
    assert by_domain["botany"][0] == "Acorn cup" and "Milton" not in by_domain["botany"][1]
    assert {k for _t, k, _d, _b in senses} == {"acorn"}
    docs = dictd.gcide_docs(iter([(["Acorn"], raw)]))
    assert [d for _t, _k, d in docs] == ["nautical", "botany"]  # the zoology stub is dropped
    assert all("(" not in t and "[" not in t and "{" not in t for t, _k, _d in docs)


@pytest.mark.parametrize(
    ("label", "domain"),
    [("Zool.", "zoology"), ('Zo["o]l.', "zoology"), ("Anat.", "medicine"), ("Eccl. Hist.", "religion"),
     ("Min.", "geology"), ("Mech.", "physics"), ("Rhet.", "grammar"), ("Bot. & Zool.", None),
     ("Physiol.", None), ("Arch[ae]ol.", None), ("Law", "law"), ("Her.", "heraldry")],
)  # fmt: skip
def test_label_domain(label: str, domain: str | None) -> None:
    assert dictd.label_domain(label) == domain


def test_strip_roff() -> None:
    src = (
        '.\\" comment\n.TH FOO 3 2023\n.SH NAME\nfoo \\- do a thing\n.SH DESCRIPTION\nThe\n.BR foo ()\n'
        "function uses \\fIbar\\fP and \\(aqx\\(aq.\n.PP\nSecond paragraph.\n.SH SEE ALSO\n.BR baz (3)\n"
    )
    assert corpora.strip_roff(src) == [
        "foo - do a thing",
        "The foo() function uses bar and 'x'.",
        "Second paragraph.",
    ]
    assert corpora.strip_roff(".so man3/other.3\n") == []


def test_chunk_paragraphs_bounds() -> None:
    paras = ["word " * 30, "x" * 50, "Sentence one is here. " * 60]
    chunks = corpora.chunk_paragraphs([p.strip() for p in paras])
    assert all(len(c) <= 800 + 200 for c in chunks)
    assert all(len(c) >= 60 for c in chunks)
    assert _norm(" ".join(chunks)) == _norm(" ".join(paras))


# ----------------------------------------------------------------------------- real domains


@pytest.fixture(scope="module")
def domains() -> dict[str, list[Doc]]:
    _need_all()
    return {d: load_domain(d) for d in DOMAINS}


def test_every_domain_is_big_enough(domains: dict[str, list[Doc]]) -> None:
    sizes = {d: len(v) for d, v in domains.items()}
    print("\n" + "\n".join(f"{d:14s} {n:6d}" for d, n in sizes.items()))
    small = {d: n for d, n in sizes.items() if n < 150}
    assert not small, f"domains under 150 docs: {small}"


def test_docs_are_clean(domains: dict[str, list[Doc]]) -> None:
    for d, docs in domains.items():
        for doc in docs:
            assert doc.domain == d and doc.key
            assert len(doc.text) >= 60, (d, doc.text)
            assert not re.match(r"^[^:]{0,60}: (See|Same as) ", doc.text) or len(doc.text) > 120, doc.text
    for d in _GCIDE_DOMAINS:
        for doc in domains[d]:
            t = doc.text
            assert "{" not in t and "}" not in t and "[" not in t and "]" not in t, t
            assert "1913 Webster]" not in t and "[PJC]" not in t and not re.search(r"--[A-Z]", t), t
            assert not re.search(r"\w\\\w", t), t
    for doc in domains["computing"]:
        assert not re.search(r"\(\d{4}-\d\d-\d\d\)", doc.text) and "{" not in doc.text[1:], doc.text


def test_labels_removed(domains: dict[str, list[Doc]]) -> None:
    label = re.compile(r"\((?:Zo\S*l\.?|Bot\.?|Botany|Zoology)\)")
    for d in ("zoology", "botany"):
        assert not [x.text for x in domains[d] if label.search(x.text)]
    for d in _GCIDE_DOMAINS:
        bad = [
            x.text
            for x in domains[d]
            if re.search(r"\((?:Chem|Med|Anat|Naut|Geol|Mus|Arch|Mil|Eccl|Theol|Gram|Her)\.\)", x.text)
        ]
        assert not bad, bad[:3]


def test_gcide_senses_start_with_headword(domains: dict[str, list[Doc]]) -> None:
    acorn = [x for x in domains["nautical"] if x.key == "acorn"]
    assert acorn and acorn[0].text.startswith("Acorn: A cone-shaped piece of wood")
    assert any(x.text.lower().startswith("whale") for x in domains["zoology"])


def test_foldoc_jargon_dedup(domains: dict[str, list[Doc]]) -> None:
    jargon = {h.lower() for h, _o, _n in dictd.read_index(DICTD / "jargon.index")}
    foldoc_all = {h.lower() for h, _o, _n in dictd.read_index(DICTD / "foldoc.index")}
    assert len(jargon & foldoc_all) > 500  # the overlap is real ...
    comp = domains["computing"]
    assert not [x.key for x in comp if x.key.lower() in jargon]  # ... and removed
    assert not [x.text for x in comp if x.text.split(":", 1)[0].lower() in jargon]


def test_bible_and_c_api_keys(domains: dict[str, list[Doc]]) -> None:
    assert {x.key for x in domains["bible"]} >= {"Ge 1", "Rev 22"}
    assert any(x.key == "printf" for x in domains["c-api"])
    assert max(len(x.text) for x in domains["c-api"]) <= 1000
    assert max(len(x.text) for x in domains["computing"]) <= 1200
    assert not [x.text for x in domains["c-api"] if re.search(r"\\f[BIRP]|^\.(SH|TH|BR) ", x.text)]


def test_load_domain_limit_is_seeded(domains: dict[str, list[Doc]]) -> None:
    a = load_domain("heraldry", limit=20, seed=1)
    assert len(a) == 20 and a == load_domain("heraldry", limit=20, seed=1)
    assert a != load_domain("heraldry", limit=20, seed=2)


def test_unknown_domain() -> None:
    with pytest.raises(TrainingError, match="unknown domain 'astrology'.*zoology"):
        load_domain("astrology")


def test_fortune_domain() -> None:
    if not (corpora.FORTUNE_DIR / "science").exists():
        pytest.skip("fortunes not installed (apt-get install -y fortunes)")
    docs = load_domain("fortune:science")
    assert len(docs) > 100 and all(d.domain == "fortune:science" and len(d.text) >= 60 for d in docs)


# ----------------------------------------------------------------------------- benchmark


def test_build_benchmark_split(domains: dict[str, list[Doc]]) -> None:
    train, test = build_benchmark(DOMAINS, 120, 40, seed=3)
    assert list(train) == DOMAINS and list(test) == DOMAINS
    train_keys = {x.key.lower() for docs in train.values() for x in docs}
    test_keys = {x.key.lower() for docs in test.values() for x in docs}
    assert not train_keys & test_keys
    text_domain: dict[str, str] = {}
    for side in (train, test):
        for d, docs in side.items():
            assert all(x.domain == d for x in docs)
            for x in docs:
                n = _norm(x.text)
                assert text_domain.setdefault(n, d) == d, f"{x.text!r} in {d} and {text_domain[n]}"
    for d in DOMAINS:
        assert len(train[d]) == 120 and len(test[d]) == 40, (d, len(train[d]), len(test[d]))
        keys = [x.key for x in test[d]]
        assert len(set(keys)) >= 10  # spread over keys, not one man page
    again = build_benchmark(DOMAINS, 120, 40, seed=3)
    assert again == (train, test)
    other = build_benchmark(DOMAINS, 120, 40, seed=4)
    assert other[1]["zoology"] != test["zoology"]


def test_build_benchmark_drops_shared_texts_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "a": [
            Doc("shared text " * 6, "k1", "a"),
            Doc("alpha only " * 6, "k2", "a"),
            Doc("alpha two " * 6, "k3", "a"),
        ],
        "b": [Doc("Shared  TEXT " * 6, "k9", "b"), Doc("beta only " * 6, "k2", "b")],
    }
    monkeypatch.setattr(corpora, "load_domain", lambda name, limit=None, seed=0: fake[name])
    train, test = build_benchmark(["a", "b"], 10, 10)
    got = {d: sorted(x.key for x in train[d] + test[d]) for d in ("a", "b")}
    # the shared text goes from both; k2 (one doc in each) goes to the smaller domain b
    assert got == {"a": ["k3"], "b": ["k2"]}


# ----------------------------------------------------------------------------- load_source


def test_load_source_txt(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("para one\nstill one\n\npara two\n")
    assert load_source(str(p)) == ["para one still one", "para two"]
    q = tmp_path / "b.txt"
    q.write_text("line one\nline two\n\n")
    assert load_source(str(q)) == ["line one", "line two"]
    assert load_source(str(q), limit=1) == ["line one"]


def test_load_source_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    rows = [{"text": "plain"}, {"input": "Q?", "output": "A."}, {"input": "Q2", "target": "T"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_source(str(p)) == ["plain", "Q?\nA.", "Q2\nT"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:1: expected a string field 'text'"):
        load_source(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(TrainingError, match="not valid JSON"):
        load_source(str(broken))


def test_load_source_fortune_file(tmp_path: Path) -> None:
    p = tmp_path / "quotes"
    long = "A fairly long quotation that certainly runs past sixty characters in all."
    p.write_text(f"{long}\n%\n{long} Again.\n%\n")
    assert load_source(str(p)) == [long, long + " Again."]


def test_load_source_corpora() -> None:
    _need_dictd("elements")
    texts = load_source("dictd:elements")
    assert len(texts) > 100 and any(t.startswith("Yttrium: ") for t in texts)
    assert not any("Atomic number" in t for t in texts)
    _need_dictd("gcide")
    zoo = load_source("zoology", limit=5)
    assert len(zoo) == 5 and all(isinstance(t, str) for t in zoo)
    if (corpora.FORTUNE_DIR / "science").exists():
        assert len(load_source("fortune:science")) > 100


def test_load_source_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"unknown source; expected .*\.jsonl.*zoology.*dictd:NAME"):
        load_source("no-such-corpus")
    with pytest.raises(TrainingError, match="no such file"):
        load_source(str(tmp_path / "missing.txt"))
    with pytest.raises(TrainingError, match=r"dictd:nosuchdb.*apt-get install -y dict-nosuchdb"):
        load_source("dictd:nosuchdb")
    with pytest.raises(TrainingError, match=r"fortune file 'nosuchfile'.*apt-get install -y fortunes"):
        load_source("fortune:nosuchfile")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TrainingError, match="no texts"):
        load_source(str(empty))


def test_missing_corpus_names_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(corpora, "BIBLE_BIN", tmp_path / "bible")
    with pytest.raises(TrainingError, match="apt-get install -y bible-kjv"):
        corpora.read_bible()


def test_disk_cache_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora, "_CACHE_MIN_SECONDS", -1.0)
    src = tmp_path / "source.txt"
    src.write_text("v1")
    calls: list[int] = []

    def build() -> list[tuple[str, str, str]]:
        calls.append(1)
        return [("some text", "key", "dom")]

    first = corpora._cached("unit", [src], build)
    assert first == corpora._cached("unit", [src], build) == [Doc("some text", "key", "dom")]
    assert len(calls) == 1 and (tmp_path / "cache" / "corpora" / "unit.json").exists()
    src.write_text("version two")  # size and mtime change: rebuilt
    corpora._cached("unit", [src], build)
    assert len(calls) == 2
