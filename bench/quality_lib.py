"""Constants of bench/quality.py: presets and the method notes printed in the report."""

from __future__ import annotations

from typing import Any

QUICK_DOMAINS = ["zoology", "botany", "law", "music", "computing", "bible"]
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"steps": 400, "train_per_domain": 300, "test_per_domain": 16, "val_per_domain": 10,
             "router_pairs_per_domain": 60, "router_k": 8, "refine_per_domain": 6, "expert_seconds": 240.0},
    "quick": {"steps": 200, "train_per_domain": 300, "test_per_domain": 16, "val_per_domain": 10,
              "router_pairs_per_domain": 40, "router_k": 6, "refine_per_domain": 4, "expert_seconds": 110.0},
}

# One line per domain, as someone who downloaded an adapter would have it: the desc-only key condition.
DESCRIPTIONS = {
    "zoology": "Zoology: animals, their anatomy, habits and classification.",
    "botany": "Botany: plants, their parts, growth and families.",
    "chemistry": "Chemistry: elements, compounds and chemical reactions.",
    "medicine": "Medicine: diseases, symptoms, anatomy and treatment.",
    "law": "Law: legal terms, courts, contracts and property.",
    "nautical": "Nautical: ships, sailing and seamanship.",
    "geology": "Geology: rocks, minerals and the structure of the earth.",
    "physics": "Physics: force, energy, light, heat and electricity.",
    "mathematics": "Mathematics: numbers, geometry, algebra and calculus.",
    "music": "Music: notes, scales, instruments and composition.",
    "architecture": "Architecture: buildings, their parts and styles.",
    "military": "Military: armies, ranks, weapons and warfare.",
    "religion": "Religion: church, theology, clergy and worship.",
    "grammar": "Grammar: parts of speech, syntax and rhetoric.",
    "heraldry": "Heraldry: coats of arms, shields and their charges.",
    "computing": "Computing: software, hardware, programming and networks.",
    "bible": "The Bible: the King James text of the Old and New Testaments.",
    "c-api": "C library and system calls: Unix manual pages for C programmers.",
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
    "whole document); the loss settings score the held-out text (its first --score-chars characters when given) "
    "under the mixture routed from that query.",
    "Losses are per-text mean token NLL (float32), averaged per domain; 'mean' is the macro mean over domains.",
    "The held-out texts are split by headword into validation and test. The best engine router (lowest validation "
    "loss of its top-3 mixture), the label-free head's tau / early stopping / interpolation, the supervised head's "
    "weight decay and step, and refine's thresholds are all chosen on validation (or on the router's own held-out "
    "pairs); every figure in the tables is on test. tfidf is a floor only (not an engine strategy).",
    "label_free trains on unlabelled (query, continuation) pairs cut from texts no expert trained on (the "
    "domains' other texts, sharing no text or headword with any training, validation or test text; query like the "
    "benchmark's, or half the words of a short text; --target-words continuation), scored under every adapter "
    "alone. It learns one key per adapter (start: the stored key or the loss-weighted centroid of the training "
    "queries; an L2 pull toward the stored key) against the target softmax(-loss / tau); start, pull, tau, step and "
    "the blend with the stored keys are picked by the routed loss on its held-out pairs, and its default-router "
    "verdict needs a paired gain over the keys of more than 2 standard errors there. supervised is a linear head "
    "over frozen MiniLM initialised at the keys, trained with cross-entropy on training texts cut like the queries.",
    "Condition b (routing_desc_only): the same adapter weights in a second library keyed by one line of "
    "description each (DESCRIPTIONS in bench/quality_lib.py).",
    "Cluster routing uses the segment-mean keys a cluster expert would get, without training cluster experts.",
    "Timing: wall and process CPU seconds per stage; the machine's load (other processes) inflates wall time.",
]
