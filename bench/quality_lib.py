"""Constants of bench/quality.py: presets and the method notes printed in the report."""

from __future__ import annotations

from typing import Any

QUICK_DOMAINS = ["zoology", "botany", "law", "music", "computing", "bible"]
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"steps": 30, "train_per_domain": 300, "test_per_domain": 30, "router_pairs_per_domain": 16,
             "router_k": 4, "refine_per_domain": 1},
    "quick": {"steps": 16, "train_per_domain": 150, "test_per_domain": 12, "router_pairs_per_domain": 10,
              "router_k": 3, "refine_per_domain": 1},
}

SETTING_NOTES = {
    "base": "the base model, no adapter",
    "oracle": "the text's own domain adapter alone",
    "routed_top1": "best engine router's top-1 adapter, weight 1",
    "routed_mix": "best engine router's top-3 adapters, softmax(score / temperature) weights",
    "uniform": "all adapters in one row, weight 1/N each",
    "merged_linear": "all adapters merged, weights 1/N, method 'cat' = exact average of the deltas (task arithmetic)",
    "merged_ties": "all adapters merged, weights 1/N, method 'ties_svd': TIES (density 0.5) on the dense deltas, "
                   "SVD to rank sum(ranks)",
    "merged_linear_peft": "PEFT 'linear' (A and B averaged separately with sqrt weights: cross terms), for reference",
}
NOTES = [
    "Routing queries are the held-out texts cut to their first ~200 characters at a word boundary (a query, not the "
    "whole document); the loss settings score the full held-out text under the mixture routed from that query.",
    "Losses are per-text mean token NLL (float32), averaged per domain; 'mean' is the macro mean over domains.",
    "The best engine router (highest top-1 among untrained, label_free, supervised, arrow) is picked on these same "
    "held-out queries; tfidf is a baseline only (not an engine strategy).",
    "label_free trains on training texts split into query / continuation with no labels; supervised trains on "
    "training texts cut like the queries, labelled with their domain.",
    "Without --cluster-train, cluster routing uses the segment-mean keys a cluster expert would get, without "
    "training the cluster experts (their weights do not change semantic routing).",
    "Timing: wall and process CPU seconds per stage; the machine's load (other processes) inflates wall time.",
]
