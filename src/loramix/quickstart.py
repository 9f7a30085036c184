"""``loramix quickstart``: a starter library of experts trained on real corpora, then routed answers.

The first run trains one expert per domain (cached in the library: a rerun reuses them) and answers
one question per domain, showing each route. Corpora are the Debian packages listed in the README.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel

from loramix.config import GenerateConfig, RouteConfig, TrainConfig

# (adapter name, corpus, description, tags, question)
STARTER: list[tuple[str, str, str, list[str], str]] = [
    ("computing", "computing", "Computing terms and jargon (FOLDOC)", ["computing"],
     "What does a compiler do with the source code of a program?"),
    ("bible", "bible", "The King James Bible", ["religion", "scripture"],
     "Who led the children of Israel out of Egypt?"),
    ("c-api", "c-api", "Linux C library and system call manual pages", ["programming", "c"],
     "How do I open a file descriptor and read bytes from it in C?"),
    ("botany", "botany", "Botany senses from the 1913 Webster dictionary", ["science", "plants"],
     "What is the part of a flower that bears the pollen?"),
    ("medicine", "medicine", "Medicine and anatomy senses from the 1913 Webster dictionary", ["science", "medicine"],
     "What is the inflammation of the membranes of the brain called?"),
]


def run_quickstart(home: str | Path | None = None, base: str | None = None, steps: int = 40, quiet: bool = False,
                   max_new_tokens: int = 48, examples: int = 1200) -> dict[str, Any]:
    from loramix.app import Loramix
    from loramix.train.corpora import load_source

    console = Console(stderr=True, quiet=quiet)
    t0 = time.perf_counter()
    eng = Loramix(home=home, base=base)
    console.print(f"[bold]loramix quickstart[/]: library at {eng.home}")
    with console.status("preparing the base model (first run converts the GGUF once)"):
        eng.base_path()
    trained: dict[str, dict[str, Any]] = {}
    for i, (name, corpus, desc, tags, _) in enumerate(STARTER, 1):
        if name in eng.library:
            rec = eng.library.get(name)
            if rec.meta.get("source") == corpus:
                console.print(f"[{i}/{len(STARTER)}] [green]reuse[/] {name} (already in the library)")
                trained[name] = {"reused": True, **rec.meta.get("train", {})}
                continue
            eng.remove_adapter(name)
        console.print(f"[{i}/{len(STARTER)}] train [bold]{name}[/] on the {corpus} corpus")
        texts = load_source(corpus, limit=examples)
        cfg = TrainConfig(steps=steps, seq_len=64, batch_size=8, max_examples=examples)
        _, report = eng.train_adapter(name, texts, cfg, description=desc, domain_tags=tags, source=corpus,
                                      progress=not quiet)
        console.print(f"    eval loss {report['eval_loss_before']:.3f} -> {report['eval_loss_after']:.3f} "
                      f"({report['seconds']:.0f} s)")
        trained[name] = {"reused": False, **{k: v for k, v in report.items() if k != "losses"}}
    t_train = time.perf_counter() - t0
    answers = []
    route_cfg = RouteConfig(k=2)
    for name, _, _, _, question in STARTER:
        ans = eng.ask(question, route=route_cfg, gen=GenerateConfig(max_new_tokens=max_new_tokens))
        answers.append({"domain": name, "question": question, **ans.to_dict()})
        route = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in ans.adapters) or "base model"
        console.print(Panel(ans.text, title=f"[bold]{question}[/]", subtitle=f"route: {route}", title_align="left"))
    total = time.perf_counter() - t0
    hits = sum(1 for a in answers if a["adapters"] and a["adapters"][0]["name"] == a["domain"])
    console.print(f"routed {hits}/{len(answers)} questions to their own domain first; "
                  f"{total:.0f} s in all ({t_train:.0f} s preparing the library)")
    return {"home": str(eng.home), "adapters": trained, "answers": answers, "top1_hits": hits,
            "seconds": total, "library_seconds": t_train}
