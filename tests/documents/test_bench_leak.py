"""bench/rag.py keeps each test text's own entry out of the collections, and its check fails on a leak."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from loramix.documents import DocStore, Retriever
from loramix.testing import HashEncoder
from loramix.train.corpora import Doc

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rag", ROOT / "bench" / "rag.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CORPUS = {
    "zoology": [
        Doc("Gull: a long-winged web-footed sea bird of the family Laridae.", "gull", "zoology"),
        Doc("Gull: a person easily cheated; a dupe.", "gull", "zoology"),
        Doc("Laridae: the family of birds including the gulls and terns.", "laridae", "zoology"),
        Doc("Tern: a sea bird related to the gulls, with a forked tail.", "tern", "zoology"),
        Doc("Petrel: a long-winged sea bird that flies far from land.", "petrel", "zoology"),
    ],
    "botany": [
        Doc("Oak: a tree of the genus Quercus bearing acorns.", "oak", "botany"),
        Doc("Quercus: the genus of oaks.", "quercus", "botany"),
        Doc("Gull: (in botany, a made-up sense) a seed pod of a sea plant.", "Gull", "botany"),
    ],
}
TESTS = {"zoology": [CORPUS["zoology"][0]], "botany": [CORPUS["botany"][0]]}


def _index(tmp_path: Path, cols: dict[str, list[Doc]]) -> tuple[DocStore, Retriever, list[str]]:
    store = DocStore(tmp_path)
    enc = HashEncoder()
    for dom, docs in cols.items():
        store.add(f"bench-{dom}", [d.text for d in docs], enc, keys=[d.key for d in docs], tags=[dom])
    return store, Retriever(store, enc), [f"bench-{d}" for d in cols]


def test_collections_exclude_every_sense_of_a_test_headword(bench, tmp_path: Path) -> None:
    cols = bench.build_collections(["zoology", "botany"], TESTS, 100, 0, load=lambda d: CORPUS[d])
    keys = {d.key.lower() for docs in cols.values() for d in docs}
    assert "gull" not in keys and "oak" not in keys  # both senses, and the same headword in another domain
    assert {"laridae", "tern", "petrel", "quercus"} <= keys
    store, ret, names = _index(tmp_path, cols)
    report = bench.check_no_leak(store, ret, [d for ds in TESTS.values() for d in ds], names)
    assert report["chunks_checked"] == 4 and report["retrieved_checked"] > 0


def test_leak_check_fails_when_an_own_entry_is_retrievable(bench, tmp_path: Path) -> None:
    tests = [d for ds in TESTS.values() for d in ds]
    leaky = {"zoology": CORPUS["zoology"][1:], "botany": CORPUS["botany"][1:2]}  # another sense of "gull" left in
    store, ret, names = _index(tmp_path / "a", leaky)
    with pytest.raises(bench.LeakError, match="gull"):
        bench.check_no_leak(store, ret, tests, names)
    # a copy of a test text under another key is caught by retrieval (the stored keys look clean)
    copied = {"zoology": [Doc(CORPUS["zoology"][0].text, "seagull", "zoology"), *CORPUS["zoology"][2:]]}
    store, ret, names = _index(tmp_path / "b", copied)
    with pytest.raises(bench.LeakError, match="retrieves its own entry"):
        bench.check_no_leak(store, ret, tests, names)


def test_related_entries_are_cross_references(bench) -> None:
    test = CORPUS["zoology"][0]
    entries = CORPUS["zoology"][2:]
    assert bench.related_entries(test, entries) == {"laridae"}  # named by the test text
    tern = Doc("Tern: a sea bird.", "tern", "zoology")
    assert bench.related_entries(tern, CORPUS["zoology"][2:]) == set()  # 'tern' (4 letters) is too short
    assert bench.related_entries(test, entries, common={"laridae"}) == set()  # an ordinary word: no reference
    petrel = Doc("Storm petrel: a small petrel.", "storm petrel", "zoology")
    assert bench.related_entries(petrel, CORPUS["zoology"][4:]) == {"petrel"}
    assert bench.related_entries(CORPUS["zoology"][4], [petrel]) == {"storm petrel"}  # names the test headword
