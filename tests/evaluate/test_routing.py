"""Routing measurements: top-k accuracy, confusion, the TF-IDF baseline, cluster mapping (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from loramix.evaluate.routing import (
    TfidfCentroidRouter,
    centroid_keys,
    confusion_matrix,
    majority_labels,
    map_ranking,
    per_label_accuracy,
    rank_by_scores,
    routing_accuracy,
    topk_accuracy,
    truncate_query,
)


def test_topk_accuracy_counts_gold_in_first_k():
    ranked = [["a", "b", "c"], ["b", "a", "c"], ["c", "b", "a"], ["b", "c"]]
    gold = ["a", "a", "a", "a"]
    assert topk_accuracy(ranked, gold, 1) == 0.25
    assert topk_accuracy(ranked, gold, 2) == 0.5
    assert topk_accuracy(ranked, gold, 3) == 0.75  # the last ranking never has "a"
    assert topk_accuracy(ranked, gold, 10) == 0.75


def test_topk_accuracy_short_and_empty_rankings():
    assert topk_accuracy([[], ["x"]], ["x", "x"], 3) == 0.5


@pytest.mark.parametrize(("ranked", "gold", "k"), [([["a"]], ["a", "b"], 1), ([["a"]], ["a"], 0), ([], [], 1)])
def test_topk_accuracy_rejects_bad_input(ranked, gold, k):
    with pytest.raises(ValueError):
        topk_accuracy(ranked, gold, k)


def test_routing_accuracy_is_fractions_with_n():
    acc = routing_accuracy([["a", "b", "c"], ["c", "b", "a"]], ["a", "a"])
    assert acc == {"top1": 0.5, "top3": 1.0, "n": 2}
    assert all(0.0 <= acc[k] <= 1.0 for k in ("top1", "top3"))


def test_per_label_accuracy():
    acc = per_label_accuracy([["a"], ["b"], ["b"], ["b"]], ["a", "a", "b", "b"])
    assert acc == {"a": 0.5, "b": 1.0}


def test_confusion_matrix_rows_are_gold_and_last_column_unrouted():
    m = confusion_matrix(["a", "b", None, "zzz", "b"], ["a", "a", "b", "b", "b"], ["a", "b"])
    assert m.tolist() == [[1, 1, 0], [0, 1, 2]]
    assert m.sum() == 5
    with pytest.raises(ValueError, match="gold label"):
        confusion_matrix(["a"], ["c"], ["a", "b"])


def test_rank_by_scores_descending_with_stable_ties():
    scores = np.array([[0.1, 0.9, 0.5], [0.2, 0.2, 0.1]])
    assert rank_by_scores(scores, ["x", "y", "z"]) == [["y", "z", "x"], ["x", "y", "z"]]
    assert rank_by_scores(scores, ["x", "y", "z"], k=1) == [["y"], ["x"]]
    with pytest.raises(ValueError):
        rank_by_scores(scores, ["x", "y"])


def test_truncate_query_cuts_at_a_word_boundary():
    text = "alpha  beta\ngamma " + "delta " * 100
    q = truncate_query(text, 20)
    assert q == "alpha beta gamma"
    assert len(q) <= 20
    assert truncate_query("short text", 200) == "short text"
    assert truncate_query("x" * 50, 10) == "x" * 10  # one long word: hard cut
    with pytest.raises(ValueError):
        truncate_query("abc", 0)


TOY = {
    "cooking": ["bake the bread in a hot oven", "whisk eggs and sugar for the cake", "simmer the soup with onions",
                "knead the dough and let the bread rise"],
    "sailing": ["hoist the mainsail and trim the jib", "the boat heeled in the gusty wind", "drop anchor in the bay",
                "tack the boat against the wind"],
    "chemistry": ["the acid reacts with the base to form salt", "oxidation of iron forms rust",
                  "the solution was titrated with sodium hydroxide", "an ionic bond between sodium and chlorine"],
}


def _toy_router() -> TfidfCentroidRouter:
    texts = [t for ts in TOY.values() for t in ts]
    labels = [lb for lb, ts in TOY.items() for _ in ts]
    return TfidfCentroidRouter().fit(texts, labels)


def test_tfidf_centroid_routes_unseen_queries_to_their_domain():
    r = _toy_router()
    assert r.labels == ["cooking", "sailing", "chemistry"]
    queries = ["bread dough in the oven", "trim the mainsail in the wind", "sodium reacts with acid"]
    gold = ["cooking", "sailing", "chemistry"]
    ranked = r.rank(queries)
    assert [row[0] for row in ranked] == gold
    assert all(sorted(row) == sorted(TOY) for row in ranked)  # full rankings
    assert routing_accuracy(ranked, gold) == {"top1": 1.0, "top3": 1.0, "n": 3}
    s = r.scores(queries)
    assert s.shape == (3, 3)
    assert np.all(s >= 0) and np.all(s <= 1 + 1e-9)  # cosines of non-negative unit vectors
    assert r.rank(queries, k=1) == [[g] for g in gold]


def test_tfidf_centroid_unknown_words_score_zero_and_errors():
    r = _toy_router()
    assert np.allclose(r.scores(["qwertyuiop zxcvbnm"]), 0.0)
    with pytest.raises(RuntimeError):
        TfidfCentroidRouter().scores(["x"])
    with pytest.raises(ValueError):
        TfidfCentroidRouter().fit(["a b"], ["x", "y"])


def test_centroid_keys_are_unit_group_means():
    vecs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    names, keys = centroid_keys(vecs, ["g1", "g1", "g2"])
    assert names == ["g1", "g2"]
    np.testing.assert_allclose(keys, [[2**-0.5, 2**-0.5], [1.0, 0.0]], rtol=1e-6)


def test_majority_labels_and_map_ranking():
    mapping = majority_labels([0, 0, 0, 1, 1, 2], ["a", "a", "b", "b", "b", "a"])
    assert mapping == {0: "a", 1: "b", 2: "a"}
    # clusters 0 and 2 both map to "a": repeats collapse, so top-3 counts distinct domains
    assert map_ranking([[2, 0, 1], [1, 2, 0], [9, 1]], mapping) == [["a", "b"], ["b", "a"], ["b"]]
    with pytest.raises(ValueError):
        majority_labels([0], ["a", "b"])
