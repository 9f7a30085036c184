"""Router training by perplexity distillation, checked where the right answer is known.

Two LoRAs are trained on the tiny base to emit a fixed continuation after a family of queries:
``code-helper`` learns the *plant* continuation, ``gardening-notes`` the *code* one, and their
examples (hence keys) say the opposite. So the untrained router sends plant questions to
gardening-notes and code questions to code-helper, the wrong adapters by the LM loss. A third,
random adapter (``kitchen``) helps nobody. After training, the trained strategy must flip both.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from loramix.app import Loramix
from loramix.base import load_base
from loramix.config import RouteConfig, RouterTrainConfig
from loramix.lora import LoraWeights
from loramix.route.trained import default_rerank, default_strategy
from loramix.testing import random_lora
from loramix.train.router import (
    candidate_losses,
    load_pairs,
    loo_losses,
    split_texts,
    target_distribution,
    train_router,
    train_supervised_router,
)
from tests.route.routedata import BOTANY, COMPUTING, COOKING

PLANT_TARGET = " botany is the study of plants."
CODE_TARGET = " the function returns a pointer to the string."


PLANT_TRAIN = [
    "How often should I water my basil?", "Why are the leaves of my fern turning brown?",
    "What soil does a cactus grow best in?", "When is the right time to repot an orchid?",
    "How do I get rid of aphids on my roses?", "Should I prune tomato plants in summer?",
    "Why is my tulip bulb not flowering?", "How deep should I plant potato tubers?",
    "What fertiliser helps strawberries fruit?", "Can a peace lily grow in low light?",
    "How do I propagate a succulent from a leaf?", "Why does my ivy have yellow spots?",
    "What is the best mulch for a vegetable garden?", "How do I keep slugs off my lettuce?",
    "When do oak trees drop their acorns?", "How much sun does lavender need?",
    "Is it too late to sow carrot seeds?", "Why are my cucumber seedlings leggy?",
]
CODE_TRAIN = [
    "Why does my Python script crash with a KeyError?", "How do I free memory allocated with malloc in C?",
    "What does the borrow checker complain about in Rust?", "How do I read a file line by line in Java?",
    "Why does my Go program deadlock on a channel?", "How do I install a gem in Ruby?",
    "What is a race condition between two threads?", "How do I fix an off-by-one error in a loop?",
    "Why is my SQL query so slow on a big table?", "How do I write a unit test with pytest?",
    "What does a stack overflow error mean?", "How do I parse JSON in a shell script?",
    "Why does git refuse to push my branch?", "How do I profile a slow function?",
    "What is the difference between a process and a thread?", "How do I compile a program with gcc?",
    "Why does my web server return error 500?", "How do I declare an array of pointers?",
]
PLANT_HELD = ["When should I feed my sunflower seedlings?", "How do I prune an apple tree in winter?",
              "The leaves of my lemon tree are turning yellow.", "How much light does a bonsai need?"]
CODE_HELD = ["Why is my JavaScript program throwing an exception?", "How can I make my Haskell code faster?",
             "My C++ binary crashes with a null pointer dereference.", "Why does my TypeScript compiler report a type error?"]
RIGHT = {"plant": "code-helper", "code": "gardening-notes"}


def train_pattern_lora(base_dir: Path, queries: list[str], target: str, steps: int = 40, seed: int = 0) -> LoraWeights:
    """A rank-8 LoRA (v/o/down proj) trained on the target tokens after each query (forward hooks, no PEFT)."""
    bm = load_base(base_dir)
    tok, model = bm.tokenizer, bm.model
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    rank, alpha = 8, 32.0
    params, hooks = {}, []
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("v_proj", "o_proj", "down_proj"):
            a = (torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5).requires_grad_()  # (r, n_in)
            b = torch.zeros(mod.out_features, rank, requires_grad=True)  # (n_out, r)
            params[name] = (a, b)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, a=a, b=b: out + alpha / rank * (inp[0] @ a.T @ b.T)))
    rows = [(tok(q, add_special_tokens=False)["input_ids"], tok(target, add_special_tokens=False)["input_ids"])
            for q in queries]
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (N, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), width), -100)  # (N, T): only the target tokens count
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
    opt = torch.optim.Adam([x for ab in params.values() for x in ab], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for h in hooks:
        h.remove()
    return LoraWeights(rank=rank, alpha=alpha, layers={n: (a.detach(), b.detach()) for n, (a, b) in params.items()})


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Two threads on a busy 2-core machine are ~15x slower than one for this tiny model."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path, one_thread: None) -> Path:
    home = tmp_path_factory.mktemp("router-lib") / "home"
    eng = Loramix(home, base=tiny_base_dir)
    plant = train_pattern_lora(tiny_base_dir, PLANT_TRAIN, PLANT_TARGET)
    code = train_pattern_lora(tiny_base_dir, CODE_TRAIN, CODE_TARGET)
    eng.add_weights(plant, "code-helper", description="Programming help", examples=COMPUTING)
    eng.add_weights(code, "gardening-notes", description="Plants and gardening", examples=BOTANY)
    eng.add_weights(random_lora(eng.base, seed=7), "kitchen", description="Cooking", examples=COOKING)
    eng.library.close()
    return home


@pytest.fixture
def engine(template: Path, tmp_path: Path, tiny_base_dir: Path) -> Loramix:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    return Loramix(home, base=tiny_base_dir)


def pairs() -> tuple[list[str], list[str]]:
    return PLANT_TRAIN + CODE_TRAIN, [PLANT_TARGET] * len(PLANT_TRAIN) + [CODE_TARGET] * len(CODE_TRAIN)


def right_prob(engine: Loramix, strategy: str, temperature: float) -> dict[str, list[float]]:
    """Router probability of the right adapter for each held-out query, per family."""
    cfg = RouteConfig(k=3, strategy=strategy, temperature=temperature)
    out: dict[str, list[float]] = {}
    for fam, qs in (("plant", PLANT_HELD), ("code", CODE_HELD)):
        routes = [engine.route(q, cfg) for q in qs]
        out[fam] = [next(a.weight for a in r.adapters if a.name == RIGHT[fam]) for r in routes]
    return out


def test_split_texts_and_load_pairs(tmp_path: Path) -> None:
    qs, ts = split_texts(["one two three four five six seven eight nine ten", "single", "a  b"])
    assert qs == ["one two three four", "a"]
    assert ts == [" five six seven eight nine ten", "  b"]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"query": "q1", "target": "t1"}) + "\n" + json.dumps({"input": "q2", "output": " t2"}) + "\n")
    assert load_pairs(str(f)) == (["q1", "q2"], [" t1", " t2"])
    txt = tmp_path / "d.txt"
    txt.write_text("alpha beta gamma delta epsilon\n\nzeta eta theta iota kappa\n")
    assert load_pairs(str(txt)) == (["alpha beta", "zeta eta"], [" gamma delta epsilon", " theta iota kappa"])


def test_target_distribution_signs() -> None:
    losses = np.array([[1.0, 2.0, 3.0]])
    assert target_distribution(losses, "kl", 0.5).argmax() == 0  # lowest loss alone
    assert target_distribution(losses, "loop", 0.5).argmax() == 2  # removing it hurts most
    assert target_distribution(losses, "kl", 1.0).sum() == pytest.approx(1.0)


def test_trained_router_prefers_the_adapter_that_lowers_the_loss(engine: Loramix) -> None:
    before = right_prob(engine, "semantic", 0.05)  # the untrained head: cosine / initial temperature
    assert all(p < 0.5 for ps in before.values() for p in ps)  # the keys mislead the untrained router
    queries, targets = pairs()
    losses = candidate_losses(engine, PLANT_HELD, [PLANT_TARGET] * 4, [["code-helper", "gardening-notes", "kitchen"]] * 4)
    assert (losses[:, 0] < losses[:, 1] - 0.3).all() and (losses[:, 0] < losses[:, 2] - 0.3).all()
    rep = train_router(engine, queries, targets, RouterTrainConfig(), progress=False)  # defaults: k=8 (3 here), 300 steps
    assert rep.k == 3 and rep.n_val == 7 and rep.rows_scored == 3 * len(queries)
    assert rep.val_agree >= 0.8 > 0.2 >= rep.val_agree_before and rep.val_kl < rep.val_kl_before / 10
    after = right_prob(engine, "trained", rep.temperature)  # route weights = the head's distribution
    print(f"\nP(right adapter) on held-out queries, before: {before}\nafter: {after}\n{rep.to_dict()}")
    assert all(p > 0.8 for ps in after.values() for p in ps)
    assert [engine.route(q, RouteConfig(k=1, strategy="trained")).adapters[0].name for q in PLANT_HELD] == \
        ["code-helper"] * 4


@pytest.fixture
def desc_engine(engine: Loramix, tmp_path: Path, tiny_base_dir: Path) -> Loramix:
    """The same three adapters in a library that knows them by a one-line description only (no examples)."""
    eng = Loramix(tmp_path / "desc", base=tiny_base_dir)
    for name, desc in (("code-helper", "Programming help: code, compilers and bugs."),
                       ("gardening-notes", "Plants and gardening: watering, soil and pruning."),
                       ("kitchen", "Cooking and recipes.")):
        eng.add_weights(engine.library.load(name), name, description=desc)
    return eng


def test_label_free_router_learns_the_loss_lowering_adapter_under_description_keys(desc_engine: Loramix) -> None:
    eng = desc_engine
    assert all(not eng.library.examples(a) for a in eng.library.ids())  # keys come from the descriptions
    semantic = RouteConfig(k=1, strategy="semantic")
    assert [eng.route(q, semantic).adapters[0].name for q in PLANT_HELD] == ["gardening-notes"] * 4  # wrong by loss
    assert default_strategy(eng.library) == "semantic"
    queries, targets = pairs()
    rep = train_router(eng, queries, targets, RouterTrainConfig(), progress=False)
    v = rep.validation
    assert v["routed_loss_trained"] < v["routed_loss_keys"] - 0.3 and v["beats_keys"] is True and v["mix"] > 0
    assert set(v["mix_losses"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"} and 0 <= v["best_step"] <= 300
    trained = RouteConfig(k=1, strategy="trained")
    assert [eng.route(q, trained).adapters[0].name for q in PLANT_HELD] == ["code-helper"] * 4
    assert [eng.route(q, trained).adapters[0].name for q in CODE_HELD] == ["gardening-notes"] * 4
    assert default_strategy(eng.library) == "trained"  # the head's own held-out verdict makes it the default
    assert json.loads((eng.library.meta_path("router") / "head.json").read_text())["validation"]["beats_keys"] is True
    rr = v["rerank"]  # the likelihood re-ranking's own held-out check, on continuation losses only
    assert rr["n_val"] == rep.n_val and rr["k"] == min(8, len(eng.library.ids())) and 0.0 <= rr["changed"] <= 1.0
    assert rr["gain"] == pytest.approx(rr["loss_keys"] - rr["loss_reranked"], abs=1e-5)
    assert rr["hurts"] == (rr["gain"] < -rr["z"] * rr["gain_se"])
    assert default_rerank(eng.library) == ("none" if rr["hurts"] else "auto")


def test_label_free_keys_learn_the_mapping_from_unlabelled_pairs_alone(engine: Loramix, tmp_path: Path,
                                                                       tiny_base_dir: Path) -> None:
    """Descriptions that say nothing: only the (query, continuation) pairs can tell the adapters apart."""
    eng = Loramix(tmp_path / "blank", base=tiny_base_dir)
    for i, name in enumerate(("code-helper", "gardening-notes", "kitchen")):
        eng.add_weights(engine.library.load(name), name, description=f"Adapter number {i + 1}.")
    queries, targets = pairs()
    rep = train_router(eng, queries, targets, RouterTrainConfig(), progress=False)
    v = rep.validation
    assert v["learn"] == "keys" and v["beats_keys"] is True and v["init"] in ("keys", "centroid")
    assert len(v["fit_losses"]) == 3 * 3 * 2  # tau x key pull x start, each judged on the held-out pairs
    trained = RouteConfig(k=1, strategy="trained")
    assert [eng.route(q, trained).adapters[0].name for q in PLANT_HELD] == ["code-helper"] * 4
    assert [eng.route(q, trained).adapters[0].name for q in CODE_HELD] == ["gardening-notes"] * 4
    head = json.loads((eng.library.meta_path("router") / "head.json").read_text())
    assert head["learn"] == "keys" and head["key_reg"] == v["key_reg"]


def test_key_pull_holds_learned_keys_at_the_stored_ones(desc_engine: Loramix) -> None:
    """A strong L2 pull toward the stored keys (the drift check inside the loss) keeps the keys in place;
    without it the same pairs move them, and the query map stays the identity when only keys are learned."""
    from safetensors.numpy import load_file

    queries, targets = pairs()
    drift = {}
    for reg in (1e4, 0.0):
        cfg = RouterTrainConfig(key_reg_grid=(reg,), centroid_init=False, tau=0.1, mix_grid=(1.0,), eval_every=300)
        train_router(desc_engine, queries, targets, cfg, progress=False)
        t = load_file(str(desc_engine.library.meta_path("router") / "head.safetensors"))
        k0 = t["keys"] / np.linalg.norm(t["keys"], axis=1, keepdims=True)
        k1 = (t["keys"] + t["key_delta"]) / np.linalg.norm(t["keys"] + t["key_delta"], axis=1, keepdims=True)
        drift[reg] = float(1 - (k0 * k1).sum(axis=1).min())
        assert not t["proj_weight"].any() and not t["proj_bias"].any()
    assert drift[1e4] < 1e-3 < drift[0.0]


def test_head_interpolated_back_to_the_keys_is_not_the_default(engine: Loramix) -> None:
    """With only mix 0 allowed the head routes exactly like the keys: no verdict for it, no default."""
    queries, targets = pairs()
    rep = train_router(engine, queries, targets, RouterTrainConfig(steps=20, mix_grid=(0.0,)), progress=False)
    v = rep.validation
    assert v["mix"] == 0.0 and v["routed_loss_trained"] == pytest.approx(v["routed_loss_keys"])
    assert v["beats_keys"] is False and default_strategy(engine.library) == "semantic"
    assert engine.route(PLANT_HELD[0], RouteConfig(k=1, strategy="trained")).adapters[0].name == "gardening-notes"


def test_loop_target_and_training(engine: Loramix) -> None:
    cands = [["gardening-notes", "code-helper", "kitchen"]] * 4
    loo = loo_losses(engine, PLANT_HELD, [PLANT_TARGET] * 4, cands)  # (4, 3)
    assert (target_distribution(loo, "loop", 0.03).argmax(axis=1) == 1).all()  # without code-helper hurts most
    loo = loo_losses(engine, CODE_HELD, [CODE_TARGET] * 4, cands)
    assert (target_distribution(loo, "loop", 0.03).argmax(axis=1) == 0).all()
    queries, targets = pairs()
    rep = train_router(engine, queries, targets, RouterTrainConfig(objective="loop"), progress=False)
    assert rep.val_agree >= 0.8
    after = right_prob(engine, "trained", rep.temperature)
    assert all(p > 0.5 for ps in after.values() for p in ps)


def test_losses_are_cached(engine: Loramix) -> None:
    mm = engine.mixer
    calls = {"n": 0}
    inner = mm.logits

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return inner(*a, **kw)

    mm.logits = counting  # type: ignore[method-assign]
    cands = [["code-helper", "kitchen"]] * 3
    first = candidate_losses(engine, PLANT_HELD[:3], [PLANT_TARGET] * 3, cands)
    assert calls["n"] > 0
    calls["n"] = 0
    again = candidate_losses(engine, PLANT_HELD[:3], [PLANT_TARGET] * 3, cands)
    assert calls["n"] == 0 and np.array_equal(first, again)
    fresh = Loramix(engine.home, base=engine._base_arg)  # another process reads the npz
    assert np.array_equal(candidate_losses(fresh, PLANT_HELD[:3], [PLANT_TARGET] * 3, cands), first)
    assert fresh._base is None  # a full cache hit never loads the base model
    changed = candidate_losses(engine, PLANT_HELD[:3], [PLANT_TARGET, PLANT_TARGET, CODE_TARGET], cands)
    assert calls["n"] == 1 and np.array_equal(changed[:2], first[:2])  # only the new rows were scored
    queries, targets = pairs()
    cfg = RouterTrainConfig(steps=5)
    assert train_router(engine, queries, targets, cfg, progress=False).rows_scored == 3 * len(queries)
    rep = train_router(engine, queries, targets, cfg, progress=False)
    assert rep.rows_scored == 0 and rep.rows_cached == 3 * len(queries)


def test_score_query_scores_the_whole_text(engine: Loramix) -> None:
    cands = [["code-helper", "kitchen"]] * 2
    qs, ts = PLANT_HELD[:2], [PLANT_TARGET] * 2
    whole = candidate_losses(engine, qs, ts, cands, score_query=True)  # (2, 2)
    assert np.allclose(whole, candidate_losses(engine, ["", ""], [q + t for q, t in zip(qs, ts, strict=True)], cands))
    cont = candidate_losses(engine, qs, ts, cands)
    assert (np.abs(whole - cont) > 1e-3).all()  # the query's tokens count: another number
    assert whole[:, 0].mean() > cont[:, 0].mean()  # code-helper learnt the continuation, not the questions


def test_supervised_router_learns_labels(engine: Loramix) -> None:
    cooking = [*COOKING, "How do I knead bread dough?", "What temperature should I roast a chicken at?",
               "How much salt goes into pasta water?", "Can I freeze cooked rice?", "How do I make a custard?"]
    texts = PLANT_TRAIN + CODE_TRAIN + cooking
    labels = ["code-helper"] * len(PLANT_TRAIN) + ["gardening-notes"] * len(CODE_TRAIN) + ["kitchen"] * len(cooking)
    rep = train_supervised_router(engine, texts, labels, RouterTrainConfig(steps=200, lr=1e-2, val_fraction=0.0),
                                  progress=False)
    assert rep.n_adapters == 3 and rep.train_acc == 1.0
    assert (engine.library.meta_path("router") / "supervised.safetensors").is_file()
    cfg = RouteConfig(k=3, strategy="supervised")
    for q, want in ((PLANT_HELD[0], "code-helper"), (CODE_HELD[0], "gardening-notes"),
                    ("Why did my sourdough bread not rise in the oven?", "kitchen")):
        r = engine.route(q, cfg)
        assert r.adapters[0].name == want and sum(a.score for a in r.adapters) == pytest.approx(1.0, abs=1e-5)


def test_cli_train_router_then_route_defaults_to_trained(engine: Loramix, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from loramix.cli import app

    data = tmp_path / "pairs.jsonl"
    queries, targets = pairs()
    data.write_text("".join(json.dumps({"query": q, "target": t}) + "\n" for q, t in zip(queries, targets, strict=True)))
    common = ["--home", str(engine.home), "--base", str(engine._base_arg)]  # route re-ranks with the base model
    before = CliRunner().invoke(app, ["route", PLANT_HELD[0], "--json", *common])
    assert before.exit_code == 0, before.output
    assert json.loads(before.stdout)["strategy"] == "semantic"
    res = CliRunner().invoke(app, ["train", "router", "--data", str(data), "--steps", "150", "--lr", "0.01", "--json",
                                   *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["val_agree"] >= 0.8
    after = json.loads(CliRunner().invoke(app, ["route", PLANT_HELD[0], "--json", *common]).stdout)
    assert after["strategy"] == "trained" and after["rerank"] == "likelihood"  # the tiny random base re-ranks
    head_only = json.loads(CliRunner().invoke(app, ["route", PLANT_HELD[0], "--json", "--lm-rerank", "none",
                                                    *common]).stdout)
    assert head_only["strategy"] == "trained" and head_only["adapters"][0]["name"] == "code-helper"
    forced = json.loads(CliRunner().invoke(app, ["route", PLANT_HELD[0], "--json", "--strategy", "semantic", *common]).stdout)
    assert forced["strategy"] == "semantic"


def test_finetune_encoder_lightly(engine: Loramix) -> None:
    queries, targets = pairs()
    rep = train_router(engine, queries[::4], targets[::4], RouterTrainConfig(steps=2, batch_size=4, finetune_encoder=True),
                       progress=False)
    folder = engine.library.meta_path("router")
    assert rep.steps == 2 and (folder / "encoder" / "model.safetensors").is_file()
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))  # no pickle anywhere
    route = engine.route(PLANT_HELD[0], RouteConfig(k=3, strategy="trained"))  # queries go through the saved encoder
    assert len(route.adapters) == 3
