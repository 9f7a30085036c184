"""Typed configuration. Each option is defined once, here, and the CLI reads its help from these.

Environment:
  LORAMIX_HOME   the library folder (default ``~/.loramix``)
  LORAMIX_BASE   a local Hugging Face causal-LM folder to use as the base model
  LORAMIX_CACHE  where converted base models are cached (default ``~/.cache/loramix``)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loramix.errors import ConfigError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_env() -> None:
    """Keep Hugging Face libraries off the network (nothing may reach a model hub at run time).

    Called by the CLI's entry point and by every loader right before it imports transformers or
    sentence-transformers (which read these variables when first imported); a value the user set wins.
    Never called at import time.
    """
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def home_dir(home: str | Path | None = None) -> Path:
    """The library folder: ``home`` if given, else ``$LORAMIX_HOME``, else ``~/.loramix``."""
    return Path(home or os.environ.get("LORAMIX_HOME") or Path.home() / ".loramix").expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("LORAMIX_CACHE") or Path.home() / ".cache" / "loramix").expanduser()


STRATEGIES = ("semantic", "tags", "hybrid", "trained", "arrow", "supervised")
# "likelihood": re-rank a strategy's first candidates by each adapter's likelihood of the query (loramix.route.likelihood);
# "auto": do so where the router has a language model to score with (a Loramix engine) and the strategy scores by
# cosine (semantic, trained), else "none"
RERANKS = ("auto", "likelihood", "none")


# nano adapters' default core size (r x r per layer): bench/nano_quality.py on 6 domains kept 74.8% of LoRA's loss
# reduction at r = 10 (10,500 parameters, 0.86% of a rank-8 LoRA) against 68.9% at r = 8 (0.55%)
NANO_RANK = 10


@dataclass
class RouteConfig:
    """How queries are routed to adapters."""

    k: int = 3  # adapters per query
    strategy: str = "semantic"  # one of STRATEGIES
    temperature: float = 0.1  # softmax temperature turning scores into mixture weights
    tags: list[str] = field(default_factory=list)  # only adapters carrying all these tags
    hybrid_alpha: float = 0.7  # hybrid score = alpha * dense + (1 - alpha) * lexical
    min_score: float | None = None  # drop candidates scoring below this
    # re-rank the strategy's first max(k, rerank_k) candidates by log posterior = rerank_prior * score - NLL of the
    # query under the candidate alone; bench/quality.py (18 domains) picked prior 50 and k 8 on its validation split
    rerank: str = "auto"  # one of RERANKS
    rerank_k: int = 8  # candidates the language model scores per query
    rerank_prior: float = 50.0  # nats per unit of strategy score (cosine): how much the keys count against the LM

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.rerank not in RERANKS:
            raise ConfigError(f"unknown rerank {self.rerank!r}; expected one of {', '.join(RERANKS)}")
        if self.rerank_k < 1:
            raise ConfigError(f"rerank_k must be at least 1, got {self.rerank_k}")
        if not self.rerank_prior > 0:
            raise ConfigError(f"rerank_prior must be > 0, got {self.rerank_prior}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown routing strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.hybrid_alpha <= 1.0:
            raise ConfigError(f"hybrid_alpha must be in [0, 1], got {self.hybrid_alpha}")


@dataclass
class MixConfig:
    """The per-row mixer's capacity."""

    capacity: int = 64  # adapter slots kept loaded per layer (LRU beyond that)
    max_rank: int = 16  # slot rank; grows when a bigger adapter is loaded
    bf16: bool = False  # bf16 autocast; off by default because it is slower on many CPUs
    memory_bytes: int = 256 << 20  # in-memory tier of loaded adapters between the slots and the library
    # A batch whose rows all share one mixture folds its delta into a copy of each targeted layer's
    # weight after this many model calls (it is decoding): later calls cost what the base model costs,
    # for the memory of the targeted weights while the batch lives. 0: never fold.
    fold_after: int = 4
    # Rows with different mixtures, in decode: a compiled C kernel (loramix.mix.kernel) reads each row's
    # adapters in place; False, or no working C compiler, keeps the torch forms.
    kernel: bool = True

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {self.capacity}")
        if self.max_rank < 1:
            raise ConfigError(f"max_rank must be at least 1, got {self.max_rank}")
        if self.fold_after < 0:
            raise ConfigError(f"fold_after must be >= 0 (0: never fold), got {self.fold_after}")


@dataclass
class GenerateConfig:
    """Generation options."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class TrainConfig:
    """Training an expert adapter."""

    kind: str = "lora"  # "lora" (PEFT LoRA) or "nano" (r x r cores over the base's SVD basis, loramix.nano)
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])
    layers_from: float = 0.5  # adapt only the top (1 - layers_from) share of layers: cheaper backward on CPU
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 96
    lr: float = 1e-3
    nano_lr: float = 0.5  # nano cores (orthonormal basis, zero init) need a far higher rate; bench/nano_quality.py on
    # 6 domains picked 0.5 over 1.0 on every domain's held-out training split at r = NANO_RANK (at r = 8: 0.3 on 4 of 6)
    eval_fraction: float = 0.1
    max_examples: int = 4000  # cap on training texts read from a source
    seed: int = 0
    # plateau stopping on the held-out split (eval_fraction of the texts): every ``eval_every`` steps
    # (0: never) the eval loss is measured; training stops after ``patience`` evals without a gain of
    # ``min_delta`` nats, or after ``max_seconds``; the best evaluated weights are kept. ``steps`` caps it.
    eval_every: int = 0
    patience: int = 3
    min_delta: float = 0.005
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.eval_every < 0 or self.patience < 1:
            raise ConfigError("eval_every must be >= 0 and patience >= 1")
        if self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")
        if self.kind not in ("lora", "nano"):
            raise ConfigError(f"unknown adapter kind {self.kind!r}; expected 'lora' or 'nano'")
        if not 0.0 <= self.layers_from < 1.0:
            raise ConfigError(f"layers_from must be in [0, 1), got {self.layers_from}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("steps and batch_size must be >= 1 and seq_len >= 8")


MAX_WEIGHT = 100.0  # |mixture or merge weight| above this is refused (1e308 overflows the mixer to inf/NaN)


@dataclass
class ScoreConfig:
    """Scoring a text: long texts are cut into windows, and memory stays bounded whatever the length."""

    max_len: int = 512  # tokens per window (1 token of overlap carries context across windows)
    max_tokens: int = 32768  # longer texts are refused (naming this limit) rather than scored for minutes
    logits_mib: int = 256  # rows per forward pass are chosen so their float32 logits fit in this many MiB

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"max_len must be at least 2, got {self.max_len}")
        if self.max_tokens < 2 or self.logits_mib < 1:
            raise ConfigError("max_tokens must be >= 2 and logits_mib >= 1")

    @property
    def max_chars(self) -> int:
        """Texts with more characters are refused before tokenizing: a BPE token averages 3-5 characters and
        rarely exceeds 16, so such a text is surely over ``max_tokens``."""
        return 16 * self.max_tokens


REFINE_ACTIONS = ("widen", "drop", "base", "auto")


@dataclass
class RefineConfig:
    """Re-routing at generation when the routed mixture looks poor for the prompt.

    Triggered when the prompt's mean token NLL under the mixture exceeds ``max_prompt_loss`` or the
    mean entropy (nats) of the first ``n_tokens`` generated distributions exceeds ``max_entropy``
    (None disables a check). Off by default: the thresholds depend on the base model, calibrate them
    with ``loramix.refine.refine_eval``.
    """

    enabled: bool = False
    max_prompt_loss: float | None = 4.0  # nats per token
    max_entropy: float | None = 3.0  # nats
    action: str = "auto"  # widen | drop | base | auto (the candidate with the lowest prompt loss)
    widen_k: int = 2  # widen: route again with k + widen_k
    n_tokens: int = 8  # generated tokens whose entropy is measured

    def __post_init__(self) -> None:
        if self.action not in REFINE_ACTIONS:
            raise ConfigError(f"unknown refine action {self.action!r}; expected one of {', '.join(REFINE_ACTIONS)}")
        if self.widen_k < 1:
            raise ConfigError(f"widen_k must be at least 1, got {self.widen_k}")
        if self.n_tokens < 1:
            raise ConfigError(f"n_tokens must be at least 1, got {self.n_tokens}")


ROUTER_OBJECTIVES = ("kl", "loop")
ROUTER_LEARN = ("keys", "head")


@dataclass
class RouterTrainConfig:
    """Training the router from each candidate adapter's loss (perplexity distillation, no domain labels).

    ``tau`` is the temperature of the target distribution over the ``k`` candidates, applied to mean
    per-token losses (nats): ``softmax(-loss / tau)`` for ``kl``, ``softmax(loss_without_k / tau)`` for
    ``loop``. A gap of ``tau`` nats/token multiplies the target odds by e. Expert gaps are typically
    0.05-0.5 nats/token, so tau = 1 would give nearly uniform targets; None picks 0.1 for kl and 0.03
    for loop (removing one of k adapters from a uniform mix moves the loss less).
    """

    k: int = 8  # candidates per query, from the untrained (semantic) router
    objective: str = "kl"  # kl: each candidate alone; loop: leave-one-out of the uniform mix
    tau: float | None = None  # target temperature (see above); None: per-objective default
    temperature: float = 0.05  # initial router temperature: logits = cosine / temperature
    learn_temperature: bool = True
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.01  # pulls the head and key deltas back toward the untrained router
    batch_size: int = 32
    finetune_encoder: bool = False  # also train the sentence encoder (slow; saved under meta/router/encoder)
    encoder_lr: float = 1e-5
    val_fraction: float = 0.2
    query_fraction: float = 0.4  # split_texts: share of words (of the first max_words) used as the query
    max_words: int = 128  # split_texts: words kept per text
    max_pairs: int = 2000  # cap on (query, target) pairs
    max_len: int = 256  # tokens of query + target scored
    gumbel_tau: float = 1.0  # kept for old configs; the supervised head now trains with cross-entropy
    target_words: int | None = None  # split_texts: words of the continuation kept (None: all); short = cheap
    eval_every: int = 10  # steps between validation checks (early stopping on the routed loss)
    mix_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # trained-vs-key score interpolation, tuned on val
    tau_grid: tuple[float, ...] = (0.03, 0.1, 0.3)  # kl targets tried when tau is None, picked on val
    # what the distillation learns: "keys" (one key per adapter, starting at its stored key, plus the
    # temperature; the query side stays the encoder) or "head" (also a d x d map of the query embedding)
    learn: str = "keys"
    # L2 pull of each learned (unit) key toward its starting key, weighted against the KL; each value is
    # tried and the one with the lowest held-out routed loss kept (a large value = the keys unchanged)
    key_reg_grid: tuple[float, ...] = (0.0, 0.3, 3.0)
    # start the keys at the loss-weighted centroid of the training queries (each query counted for the
    # candidates in proportion to the target distribution), blended with the stored key: tried as well
    # as the plain start when True; picked on the held-out pairs
    centroid_init: bool = True
    # score the query's own tokens as well as the target's (the loss of the whole text): more tokens of
    # signal per pair at no extra cost (the query runs through the model anyway); off, only the target counts
    score_query: bool = False
    min_gain: float = 0.0  # nats: the head beats the keys only if its val routed loss is lower by more
    verdict_z: float = 2.0  # ... and the paired per-pair gain is at least this many standard errors
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ROUTER_OBJECTIVES:
            raise ConfigError(f"unknown router objective {self.objective!r}; expected one of {', '.join(ROUTER_OBJECTIVES)}")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2 (the router learns to rank candidates), got {self.k}")
        if self.tau is not None and not self.tau > 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if not self.temperature > 0 or not self.gumbel_tau > 0:
            raise ConfigError("temperature and gumbel_tau must be > 0")
        if self.steps < 1 or self.batch_size < 1 or self.max_pairs < 1 or self.max_len < 8:
            raise ConfigError("steps, batch_size and max_pairs must be >= 1 and max_len >= 8")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.query_fraction < 1.0:
            raise ConfigError(f"query_fraction must be in (0, 1), got {self.query_fraction}")
        if self.learn not in ROUTER_LEARN:
            raise ConfigError(f"unknown router learn {self.learn!r}; expected one of {', '.join(ROUTER_LEARN)}")
        if not self.key_reg_grid or any(r < 0 for r in self.key_reg_grid):
            raise ConfigError(f"key_reg_grid needs at least one value, all >= 0; got {self.key_reg_grid}")

    @property
    def target_tau(self) -> float:
        """``tau``, or the objective's default."""
        if self.tau is not None:
            return self.tau
        return 0.1 if self.objective == "kl" else 0.03


FUSIONS = ("rrf", "mix", "dense", "bm25")


@dataclass
class DocsConfig:
    """Retrieval of document passages for a query and their place in the prompt (loramix.documents).

    ``collections``: collection names, ``tag:NAME`` (every collection carrying the tag) or ``auto``
    (collections sharing a tag with the routed adapters). Dense and BM25 each give ``candidates``
    chunks; ``fusion`` ranks them: ``rrf`` (reciprocal rank fusion with constant ``rrf_k``), ``mix`` (a
    weighted sum of each retriever's min-max normalised scores, ``dense_weight`` on dense, the rest on
    BM25; 1.0 ranks like dense alone), or one retriever alone; with ``rerank`` the top ``rerank_top`` are re-ordered by the language model's loss of the
    query given each passage. ``passages`` chunks go into the prompt, at most ``budget`` tokens of them.
    """

    collections: list[str] = field(default_factory=list)
    passages: int = 3  # passages placed in the prompt
    candidates: int = 30  # chunks taken from each retriever before fusion
    # rrf | mix | dense | bm25. Default dense: in both bench/rag.py runs (docs/results/rag/) dense alone beat RRF
    # fusion on recall@5 (0.322 vs 0.237; earlier 0.650 vs 0.517) and the validation split tuned mix to weight 1.0
    fusion: str = "dense"
    rrf_k: int = 60
    dense_weight: float = 0.5  # fusion="mix": weight of the dense score (1 - it on BM25's)
    rerank: bool = False  # re-order by the LM's loss of the query given each passage (Atlas-style)
    rerank_top: int = 10  # fused candidates the LM scores
    budget: int = 384  # tokens of passages in the prompt
    chunk_words: int = 96  # words per chunk when a collection is added
    chunk_overlap: int = 24  # words shared by consecutive chunks of one document

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {self.fusion!r}; expected one of {', '.join(FUSIONS)}")
        if self.passages < 0 or self.candidates < 1 or self.rerank_top < 1 or self.rrf_k < 1:
            raise ConfigError("passages must be >= 0 and candidates, rerank_top, rrf_k >= 1")
        if not 0.0 <= self.dense_weight <= 1.0:
            raise ConfigError(f"dense_weight must be in [0, 1], got {self.dense_weight}")
        if self.budget < 16:
            raise ConfigError(f"budget must be at least 16 tokens, got {self.budget}")
        if self.chunk_words < 8 or not 0 <= self.chunk_overlap < self.chunk_words:
            raise ConfigError(f"chunk_words must be >= 8 and 0 <= chunk_overlap < chunk_words, got "
                              f"{self.chunk_words} and {self.chunk_overlap}")
