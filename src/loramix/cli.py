"""The ``loramix`` command line. Each subcommand is a typed function; its docstring is its --help."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loramix.cli_docs import docs_app
from loramix.config import (
    NANO_RANK,
    DocsConfig,
    GenerateConfig,
    MixConfig,
    RefineConfig,
    RouteConfig,
    ScoreConfig,
    TrainConfig,
    offline_env,
)
from loramix.errors import ConfigError, LoramixError, one_line, short
from loramix.serve.settings import ServeSettings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="A library of LoRA adapters for one causal LM: route, mix, merge, train, generate.")
adapters_app = typer.Typer(no_args_is_help=True, help="Manage the adapter library.")
train_app = typer.Typer(no_args_is_help=True, help="Train expert adapters and the router.")
app.add_typer(adapters_app, name="adapters")
app.add_typer(train_app, name="train")
app.add_typer(docs_app, name="docs")
console = Console(stderr=True, soft_wrap=True)  # soft_wrap: no hard line breaks at 80 columns when piped
out = Console(highlight=False, soft_wrap=True)

Home = Annotated[Path | None, typer.Option("--home", envvar="LORAMIX_HOME", help="Library folder (default ~/.loramix).")]
Base = Annotated[str | None, typer.Option("--base", envvar="LORAMIX_BASE", help="Local Hugging Face causal-LM folder.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
K = Annotated[int, typer.Option("--k", help="Adapters per query.")]
Strategy = Annotated[str | None, typer.Option("--strategy", help="semantic | tags | hybrid | trained | supervised | arrow (default: trained where the trained head's stored held-out check says it beats the keys, else semantic).")]
Temp = Annotated[float, typer.Option("--route-temperature", help="Softmax temperature for mixture weights.")]
Tags = Annotated[str, typer.Option("--tags", help="Only adapters with all these comma-separated tags.")]
Bf16 = Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast (often slower on CPU).")]
Docs = Annotated[str | None, typer.Option("--docs", help="Document collections for passages: names, tag:NAME or auto (comma-separated).")]
Passages = Annotated[int, typer.Option("--passages", help="Retrieved passages placed in the prompt.")]
Rerank = Annotated[bool, typer.Option("--rerank/--no-rerank", help="Re-order passages by the LM's loss of the query given each (slower).")]
Budget = Annotated[int, typer.Option("--budget", help="Most tokens of passages in the prompt.")]
LmRerank = Annotated[str, typer.Option("--lm-rerank", help="auto | likelihood | none: re-order the strategy's top candidates by each adapter's likelihood of the query (auto: on, unless the trained router's held-out check found it hurts; loads the base model).")]

_R, _G, _T, _M = RouteConfig(), GenerateConfig(), TrainConfig(), MixConfig()
_RF, _S = RefineConfig(), ScoreConfig()
InputFile = Annotated[Path | None, typer.Option("--file", help="Read the text from this file ('-': standard input).")]
_D = DocsConfig()


def _docs_cfg(docs: str | None, passages: int, rerank: bool = False, budget: int = _D.budget) -> DocsConfig | None:
    return DocsConfig(collections=_csv(docs), passages=passages, rerank=rerank, budget=budget) if docs else None


def _engine(home: Path | None, base: str | None = None, bf16: bool = False):
    from loramix.app import Loramix

    return Loramix(home=home, base=base, mix=MixConfig(bf16=bf16))


def _csv(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _route_cfg(k: int, strategy: str | None, temperature: float, tags: str, home: Path | None = None,
               rerank: str = "auto") -> RouteConfig:
    from loramix.route.trained import default_rerank, default_strategy
    from loramix.store import Library

    if strategy is None:  # the trained router when the library has one
        strategy = default_strategy(Library(home))
    if rerank == "auto":  # off where the library's stored held-out verdict says the re-ranking hurts
        rerank = default_rerank(Library(home))
    return RouteConfig(k=k, strategy=strategy, temperature=temperature, tags=_csv(tags), rerank=rerank)


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _print_json(obj: Any) -> None:
    """Strict JSON on one line: never bare NaN or Infinity (non-finite numbers print as null)."""
    sys.stdout.write(json.dumps(_finite(obj), default=str, allow_nan=False) + "\n")


def _read_input(path: Path, what: str) -> str:
    """A UTF-8 text from a file or, for '-', standard input; refused past the score size limit."""
    limit = 4 * _S.max_chars  # bytes: UTF-8 takes at most 4 per character
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} from {short(str(path))}: {one_line(e.strerror or e)}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} in {short(str(path))} is over the limit of {limit:,} bytes (4 x 16 x "
                          f"ScoreConfig.max_tokens); expected a shorter text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} in {short(str(path))} is not UTF-8 text ({one_line(e)})") from None


def _one_of(text: str | None, file: Path | None, what: str, flags: str) -> str:
    if (text is None) == (file is None):
        raise typer.BadParameter(f"give exactly one of {flags}")
    return text if text is not None else _read_input(file, what)  # type: ignore[arg-type]


def _show_route(adapters: list[dict[str, Any]]) -> None:
    if not adapters:
        console.print("[dim]route: base model (no adapter)[/]")
        return
    parts = [f"[bold]{a['name']}[/] {a['weight']:.2f}" for a in adapters]
    console.print("route: " + ", ".join(parts))


# --- adapters ---------------------------------------------------------------------------------
@adapters_app.command("add")
def adapters_add(path: Path, name: Annotated[str, typer.Option("--name")], home: Home = None, base: Base = None,
                 description: Annotated[str, typer.Option("--description")] = "",
                 tags: Annotated[str, typer.Option("--tags", help="Domain tags, comma-separated.")] = "",
                 skills: Annotated[str, typer.Option("--skills", help="Skill tags, comma-separated.")] = "",
                 examples: Annotated[Path | None, typer.Option("--examples", help="Example inputs: one per line, or JSONL with 'text'.")] = None,
                 tenant: Annotated[str | None, typer.Option("--tenant", help="Owner tenant (as in the server's --api-keys file); default: the shared library, visible to all.")] = None,
                 public: Annotated[bool, typer.Option("--public", help="With --tenant: visible to every tenant (default private to its owner).")] = False,
                 as_json: Json = False) -> None:
    """Import a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into the library.

    Names are unique across the whole library, all tenants included.
    """
    if public and tenant is None:
        raise typer.BadParameter("--public needs --tenant: adapters without an owner are already visible to all")
    ex = _read_examples(examples) if examples else None
    eng = _engine(home, base)
    rec = eng.add_adapter(path, name, description=description, domain_tags=_csv(tags),
                          skill_tags=_csv(skills), examples=ex, owner=tenant, public=public)
    eng.library.audit("add", tenant=tenant, adapter=rec.name, detail={"via": "cli", "public": public})
    if as_json:
        _print_json(rec.to_dict())
    else:
        console.print(f"added [bold]{rec.name}[/] ({rec.id}): rank {rec.rank}, {rec.n_params:,} parameters, "
                      f"targets {','.join(rec.target_modules)}")


def _read_examples(path: Path) -> list[str]:
    from loramix.train.corpora import load_source

    return load_source(str(path))


@adapters_app.command("list")
def adapters_list(home: Home = None, tags: Tags = "",
                  tenant: Annotated[str | None, typer.Option("--tenant", help="Only what this tenant may see (shared, public and its own).")] = None,
                  as_json: Json = False,
                  limit: Annotated[int, typer.Option("--limit", help="At most this many (0: all).")] = 100,
                  offset: Annotated[int, typer.Option("--offset", help="Skip this many first.")] = 0) -> None:
    """List the adapters in the library (a page of --limit at a time)."""
    from loramix.store import Library

    recs = Library(home).list(tags=_csv(tags) or None, tenant=tenant, limit=limit or None, offset=offset)
    if as_json:
        _print_json([r.to_dict() for r in recs])
        return
    table = Table("name", "id", "rank", "params", "tags", "uses", "owner", "description")
    for r in recs:
        owner = "shared" if r.owner is None else f"{r.owner} ({'public' if r.public else 'private'})"
        table.add_row(r.name, r.id, str(r.rank), f"{r.n_params:,}", ",".join(r.tags), str(r.use_count), owner,
                      r.description[:60])
    out.print(table)


@adapters_app.command("show")
def adapters_show(name: str, home: Home = None, as_json: Json = False) -> None:
    """Show one adapter's record."""
    from loramix.store import Library

    lib = Library(home)
    rec = lib.get(name)
    d = rec.to_dict() | {"examples": len(lib.examples(rec.id)), "events": lib.events(rec.id, limit=20)}
    if as_json:
        _print_json(d)
    else:
        for k, v in d.items():
            out.print(f"[bold]{k}[/]: {v}")


@adapters_app.command("rm")
def adapters_rm(name: str, home: Home = None) -> None:
    """Remove an adapter from the library."""
    from loramix.store import Library

    Library(home).remove(name)
    console.print(f"removed {name}")


@adapters_app.command("audit")
def adapters_audit(home: Home = None, limit: Annotated[int, typer.Option("--limit", help="Newest rows to show.")] = 50,
                   tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's actions.")] = None,
                   as_json: Json = False) -> None:
    """Show the audit log (every library change and generation, with its tenant and outcome), newest first."""
    import datetime

    from loramix.store import Library

    rows = Library(home).audit_log(limit, tenant=tenant)
    if as_json:
        _print_json(rows)
        return
    table = Table("time (UTC)", "tenant", "action", "adapter", "outcome", "detail")
    for r in rows:
        ts = datetime.datetime.fromtimestamp(r["ts"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(ts, r["tenant"] or "-", r["action"], r["adapter"] or "-", r["outcome"],
                      json.dumps(r["detail"])[:60])
    out.print(table)


@adapters_app.command("gc")
def adapters_gc(home: Home = None,
                dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
                stale_after: Annotated[float, typer.Option("--stale-after", help="Keep temp files younger than this many seconds (an import may be writing them).")] = 3600.0,
                as_json: Json = False) -> None:
    """Remove leftover temp files, trash and orphan blobs (safe while other processes use the library)."""
    from loramix.store import Library

    if not stale_after >= 0:
        raise typer.BadParameter(f"--stale-after must be >= 0, got {stale_after}")
    rep = Library(home).gc(stale_after=stale_after, dry_run=dry_run)
    if as_json:
        _print_json(rep.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(rep.temp_files)} temp/trash files and {len(rep.orphan_blobs)} orphan blobs "
                  f"({rep.bytes:,} bytes)" + (f"; restored {len(rep.restored)} blobs" if rep.restored else ""))
    if rep.unkeyed:
        console.print(f"{len(rep.unkeyed)} adapters have no routing key (keyed at the next engine start): "
                      + short(", ".join(rep.unkeyed), 400))


@adapters_app.command("export")
def adapters_export(name: str, out_dir: Path, home: Home = None) -> None:
    """Write an adapter as a PEFT folder that PeftModel.from_pretrained loads."""
    from loramix.store import Library

    path = Library(home).export(name, out_dir)
    console.print(f"exported {name} to {path}")


@adapters_app.command("merge")
def adapters_merge(names: list[str], name: Annotated[str, typer.Option("--name", help="Name of the new adapter.")],
                   weights: Annotated[str, typer.Option("--weights", help="Comma-separated, one per adapter (default equal).")] = "",
                   method: Annotated[str, typer.Option("--method", help="linear|cat|ties|dare_linear|dare_ties|svd|magnitude_prune|...")] = "linear",
                   density: Annotated[float, typer.Option("--density", help="Kept share for ties/dare/magnitude_prune.")] = 0.5,
                   svd_rank: Annotated[int | None, typer.Option("--svd-rank")] = None,
                   seed: Annotated[int, typer.Option("--seed", help="Seed for DARE's random drops.")] = 0,
                   home: Home = None, as_json: Json = False) -> None:
    """Merge adapters into a new library adapter (same semantics as PEFT's add_weighted_adapter)."""
    try:
        w = [float(x) for x in _csv(weights)] if weights else [1.0 / len(names)] * len(names)
    except ValueError:
        raise typer.BadParameter(f"--weights {short(repr(weights))}: expected comma-separated numbers") from None
    rec = _engine(home).merge(names, w, method, name, density=density, svd_rank=svd_rank, seed=seed)
    if as_json:
        _print_json(rec.to_dict())
    else:
        console.print(f"merged {', '.join(names)} -> [bold]{rec.name}[/] ({method}, rank {rec.rank})")


# --- route / score / ask ----------------------------------------------------------------------
@app.command("route")
def route(query: Annotated[str | None, typer.Argument(help="The query (or give --file).")] = None,
          file: InputFile = None, k: K = _R.k, strategy: Strategy = None, temperature: Temp = _R.temperature,
          tags: Tags = "", lm_rerank: LmRerank = _R.rerank, home: Home = None, base: Base = None,
          as_json: Json = False) -> None:
    """Pick the top-k adapters for a query and their mixture weights."""
    query = _one_of(query, file, "the query", "QUERY or --file")
    r = _engine(home, base).route(query, _route_cfg(k, strategy, temperature, tags, home, lm_rerank))
    d = r.to_dict()
    if as_json:
        _print_json({"adapters": [{"name": a["name"], "score": a["score"], "weight": a["weight"]} for a in d["adapters"]],
                     "latency_ms": d["latency_ms"], "strategy": d["strategy"], "rerank": d["rerank"]})
        return
    table = Table("adapter", "score", "weight")
    for a in d["adapters"]:
        table.add_row(a["name"], f"{a['score']:.3f}", f"{a['weight']:.3f}")
    out.print(table)
    how = (f"{d['strategy']}, re-ranked by likelihood ({d['rerank_ms']:.0f} ms)" if d["rerank"] == "likelihood"
           else d["strategy"])
    console.print(f"[dim]{how}; {d['latency_ms']:.1f} ms[/]")


@app.command("score")
def score(text: Annotated[str | None, typer.Option("--text")] = None,
          file: InputFile = None,
          adapters: Annotated[str | None, typer.Option("--adapters", help="Forced mixture 'name:w,name:w'.")] = None,
          do_route: Annotated[bool, typer.Option("--route", help="Route the text to pick the mixture.")] = False,
          k: K = _R.k, strategy: Strategy = None, temperature: Temp = _R.temperature, tags: Tags = "",
          lm_rerank: LmRerank = _R.rerank, docs: Docs = None, passages: Passages = _D.passages, rerank: Rerank = False,
          prompt: Annotated[str | None, typer.Option("--prompt", help="With --docs: the query; the text is scored as its continuation.")] = None,
          home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Mean token negative log-likelihood of a text (float32) under a mixture, a route, or the base model.

    With --docs, retrieved passages precede the text as plain context and are listed."""
    from loramix.app import parse_mixture

    body = _one_of(text, file, "the text to score", "--text or --file")
    mix = parse_mixture(adapters) if adapters else None
    rcfg = _route_cfg(k, strategy, temperature, tags, home, lm_rerank) if do_route and not mix else None
    res = _engine(home, base).score(body, adapters=mix, route=rcfg, docs=_docs_cfg(docs, passages, rerank),
                                    prompt=prompt)
    if as_json:
        _print_json(res)
    else:
        _show_route(res["adapters"])
        _show_passages(res.get("passages"))
        out.print(f"loss {res['loss']:.4f} over {res['tokens']} tokens")


@app.command("ask")
def ask(prompt: str, adapters: Annotated[str | None, typer.Option("--adapters", help="Forced mixture 'name:w,name:w'.")] = None,
        k: K = _R.k, strategy: Strategy = None, route_temperature: Temp = _R.temperature, tags: Tags = "",
        lm_rerank: LmRerank = _R.rerank, no_route: Annotated[bool, typer.Option("--no-route", help="Answer with the base model alone.")] = False,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = _G.max_new_tokens,
        temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = _G.temperature,
        refine: Annotated[bool, typer.Option("--refine/--no-refine", help="Re-route when the routed mixture looks poor.")] = _RF.enabled,
        max_prompt_loss: Annotated[float | None, typer.Option("--max-prompt-loss", help="Refine above this prompt NLL (nats/token).")] = _RF.max_prompt_loss,
        max_entropy: Annotated[float | None, typer.Option("--max-entropy", help="Refine above this mean entropy of the first tokens (nats).")] = _RF.max_entropy,
        refine_action: Annotated[str, typer.Option("--refine-action", help="widen | drop | base | auto.")] = _RF.action,
        docs: Docs = None, passages: Passages = _D.passages, rerank: Rerank = False, budget: Budget = _D.budget,
        home: Home = None, base: Base = None, bf16: Bf16 = False, as_json: Json = False) -> None:
    """Route the prompt, mix the chosen adapters and generate an answer (streamed).

    With --docs, retrieved passages go into the prompt and are listed after the answer."""
    from loramix.app import parse_mixture

    eng = _engine(home, base, bf16)
    mix = parse_mixture(adapters) if adapters else None
    rcfg = None if (mix or no_route) else _route_cfg(k, strategy, route_temperature, tags, home, lm_rerank)
    if not as_json and rcfg is not None:
        _show_route(eng.route(prompt, rcfg).to_dict()["adapters"])
    elif not as_json and mix:
        _show_route([{"name": r.name, "weight": w} for r, w in eng.resolve(mix)])

    def stream(t: str) -> None:
        sys.stdout.write(t)
        sys.stdout.flush()

    rf = RefineConfig(enabled=refine, max_prompt_loss=max_prompt_loss, max_entropy=max_entropy, action=refine_action)
    ans = eng.ask(prompt, adapters=mix, route=rcfg, gen=GenerateConfig(max_new_tokens, temperature),
                  on_text=None if as_json else stream, refine=rf, docs=_docs_cfg(docs, passages, rerank, budget))
    if as_json:
        _print_json(ans.to_dict())
    else:
        sys.stdout.write("\n")
        _show_refine(ans.info.get("refine"))
        _show_passages(ans.info.get("passages"))


def _show_passages(passages: list[dict[str, Any]] | None) -> None:
    for i, p in enumerate(passages or [], 1):
        console.print(f"[dim][{i}] {p['collection']}:{p['key']} ({p['id']}) score {p['score']:.4f}[/]")


def _show_refine(info: dict[str, Any] | None) -> None:
    if not info:
        return
    signals = f"prompt loss {info['prompt_loss']}, entropy {info['entropy']}"
    if not info["triggered"]:
        console.print(f"[dim]refine: not needed ({signals})[/]")
        return
    after = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in info["after"]) or "base model"
    console.print(f"refine: {info['action']} -> {info['chosen']} ({signals}); answered with {after}")


# --- training ---------------------------------------------------------------------------------
@train_app.command("adapter")
def train_adapter(name: Annotated[str, typer.Option("--name")],
                  data: Annotated[str, typer.Option("--data", help="Text/JSONL file, or a corpus: zoology, computing, bible, c-api, dictd:NAME, fortune:NAME.")],
                  description: Annotated[str, typer.Option("--description")] = "",
                  tags: Annotated[str, typer.Option("--tags")] = "",
                  steps: Annotated[int, typer.Option("--steps")] = _T.steps,
                  kind: Annotated[str, typer.Option("--kind", help="lora, or nano: r x r cores over the base's SVD basis (~1% of LoRA's size).")] = _T.kind,
                  rank: Annotated[int | None, typer.Option("--rank", help=f"LoRA rank (default {_T.rank}); nano: core size r (default {NANO_RANK}).")] = None,
                  lr: Annotated[float, typer.Option("--lr", help="Learning rate (LoRA).")] = _T.lr,
                  nano_lr: Annotated[float, typer.Option("--nano-lr", help="Learning rate of nano cores (--kind nano).")] = _T.nano_lr,
                  batch_size: Annotated[int, typer.Option("--batch-size")] = _T.batch_size,
                  seq_len: Annotated[int, typer.Option("--seq-len")] = _T.seq_len,
                  max_examples: Annotated[int, typer.Option("--max-examples")] = _T.max_examples,
                  docs: Docs = None, passages: Passages = _D.passages,
                  home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Train an expert LoRA adapter on a corpus and add it to the library (eval loss before/after).

    With --docs, a retrieval-aware expert: each text's opening follows retrieved passages (never the
    text's own) and the loss is on the rest of the text only."""
    from loramix.train.corpora import load_source

    texts = load_source(data, limit=max_examples)
    rank = rank or (NANO_RANK if kind == "nano" else _T.rank)
    cfg = TrainConfig(kind=kind, steps=steps, rank=rank, alpha=2.0 * rank, lr=lr, nano_lr=nano_lr, batch_size=batch_size, seq_len=seq_len,
                      max_examples=max_examples)
    rec, report = _engine(home, base).train_adapter(name, texts, cfg, description=description or f"expert trained on {data}",
                                                    domain_tags=_csv(tags), source=data, progress=not as_json,
                                                    docs=_docs_cfg(docs, passages))
    res = {"adapter": rec.to_dict(), "eval_loss_before": report["eval_loss_before"],
           "eval_loss_after": report["eval_loss_after"], "seconds": report["seconds"]}
    if as_json:
        _print_json(res)
    else:
        console.print(f"[bold]{rec.name}[/]: eval loss {report['eval_loss_before']:.3f} -> "
                      f"{report['eval_loss_after']:.3f} in {report['seconds']:.0f} s")


@train_app.command("experts")
def train_experts(data: Annotated[str, typer.Option("--data", help="Unlabelled texts: a file, a corpus, or comma-separated corpora (zoology,botany,bible; each corpus is then a true label).")],
                  n: Annotated[int, typer.Option("--n", help="Number of segments (experts).")],
                  prefix: Annotated[str, typer.Option("--prefix", help="Adapters are named PREFIX-0 .. PREFIX-(N-1).")] = "cluster",
                  steps: Annotated[int, typer.Option("--steps")] = _T.steps,
                  kind: Annotated[str, typer.Option("--kind", help="lora, or nano: r x r cores over the base's SVD basis (~1% of LoRA's size).")] = _T.kind,
                  rank: Annotated[int | None, typer.Option("--rank", help=f"LoRA rank (default {_T.rank}); nano: core size r (default {NANO_RANK}).")] = None,
                  lr: Annotated[float, typer.Option("--lr", help="Learning rate (LoRA).")] = _T.lr,
                  nano_lr: Annotated[float, typer.Option("--nano-lr", help="Learning rate of nano cores (--kind nano).")] = _T.nano_lr,
                  batch_size: Annotated[int, typer.Option("--batch-size")] = _T.batch_size,
                  seq_len: Annotated[int, typer.Option("--seq-len")] = _T.seq_len,
                  max_examples: Annotated[int, typer.Option("--max-examples", help="Texts read and clustered, at most.")] = _T.max_examples,
                  seed: Annotated[int, typer.Option("--seed")] = _T.seed,
                  home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Cluster unlabelled texts into N segments (k-means on sentence embeddings) and train one expert per segment.

    Reports each segment's size and top terms, and the adjusted Rand index when true labels exist
    (JSONL with a 'label'/'domain' field, or a comma-separated corpus list).
    """
    from loramix.train.experts import load_texts
    from loramix.train.experts import train_experts as run

    texts, labels = load_texts(data, limit=max_examples, seed=seed)
    rank = rank or (NANO_RANK if kind == "nano" else _T.rank)
    cfg = TrainConfig(kind=kind, steps=steps, rank=rank, alpha=2.0 * rank, lr=lr, nano_lr=nano_lr, batch_size=batch_size, seq_len=seq_len,
                      max_examples=max_examples, seed=seed)
    res = run(_engine(home, base), texts, n, cfg, prefix=prefix, seed=seed, true_labels=labels, source=data,
              progress=not as_json, log=None if as_json else lambda m: console.print(f"[dim]{m}[/]"))
    if as_json:
        _print_json(res)
        return
    table = Table("adapter", "texts", "top terms", "eval loss", *(["true labels"] if labels else []))
    for sg in res["segments"]:
        row = [sg["name"], str(sg["size"]), ", ".join(sg["terms"][:6]),
               f"{sg['eval_loss_before']:.3f} -> {sg['eval_loss_after']:.3f}"]
        if labels:
            row.append(", ".join(f"{k}:{v}" for k, v in list(sg["labels"].items())[:3]))
        table.add_row(*row)
    out.print(table)
    for sg in res["skipped"]:
        console.print(f"[yellow]skipped {sg['name']}[/] ({sg['size']} texts): {sg['reason']}")
    if res["ari"] is not None:
        console.print(f"segments vs true labels: adjusted Rand index {res['ari']:.3f}")


@train_app.command("router")
def train_router(data: Annotated[str | None, typer.Option("--data", help="JSONL of query/target (or input/output) pairs, or texts cut into query (first 40% of words) and target: a file, zoology, computing, bible, c-api, dictd:NAME, fortune:NAME.")] = None,
                 k: Annotated[int | None, typer.Option("--k", help="Candidates per query from the current router (default 8).")] = None,
                 objective: Annotated[str | None, typer.Option("--objective", help="kl: each candidate alone | loop: leave one out of their uniform mix (default kl).")] = None,
                 steps: Annotated[int | None, typer.Option("--steps", help="AdamW steps (default 300).")] = None,
                 lr: Annotated[float | None, typer.Option("--lr", help="Learning rate (default 3e-3).")] = None,
                 tau: Annotated[float | None, typer.Option("--tau", help="Target temperature on per-token losses (default 0.1 for kl, 0.03 for loop).")] = None,
                 batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
                 max_pairs: Annotated[int | None, typer.Option("--max-pairs", help="Use at most this many pairs (default 2000).")] = None,
                 finetune_encoder: Annotated[bool, typer.Option("--finetune-encoder", help="Also fine-tune the sentence encoder (slow).")] = False,
                 labels: Annotated[bool, typer.Option("--labels", help="Train the supervised baseline instead: --data JSONL with 'text' + 'adapter', or without --data the adapters' stored examples.")] = False,
                 seed: Annotated[int | None, typer.Option("--seed")] = None,
                 home: Home = None, base: Base = None, as_json: Json = False) -> None:
    """Learn the router from each candidate adapter's loss on (query, target) pairs (perplexity distillation, no labels)."""
    from loramix.config import RouterTrainConfig
    from loramix.train import router as rt

    given: dict[str, Any] = {"k": k, "objective": objective, "steps": steps, "lr": lr, "tau": tau, "batch_size": batch_size,
             "max_pairs": max_pairs, "seed": seed}
    cfg = RouterTrainConfig(finetune_encoder=finetune_encoder, **{n: v for n, v in given.items() if v is not None})
    eng = _engine(home, base)
    if labels:
        texts, names = rt.load_labelled(eng, data)
        res = rt.train_supervised_router(eng, texts, names, cfg, progress=not as_json).to_dict()
        summary = (f"supervised router over {res['n_adapters']} adapters: accuracy train {res['train_acc']:.3f}, "
                   f"val {res['val_acc']:.3f}")
    else:
        if data is None:
            raise typer.BadParameter("give --data (or --labels to train the supervised baseline)")
        queries, targets = rt.load_pairs(data, cfg)
        res = rt.train_router(eng, queries, targets, cfg, progress=not as_json).to_dict()
        summary = (f"router ({res['objective']}, k={res['k']}, {res['n_train']}+{res['n_val']} queries): val KL "
                   f"{res['val_kl_before']:.4f} -> {res['val_kl']:.4f}, top-1 agreement with the best candidate "
                   f"{res['val_agree_before']:.2f} -> {res['val_agree']:.2f} (train {res['train_agree']:.2f}); "
                   f"{res['rows_scored']} rows scored, {res['rows_cached']} cached")
    if as_json:
        _print_json(res)
    else:
        console.print(f"{summary}\nsaved {res['path']}")


@app.command("quickstart")
def quickstart(home: Home = None, base: Base = None,
               steps: Annotated[int, typer.Option("--steps", help="Training steps per expert.")] = 40,
               as_json: Json = False) -> None:
    """Build a starter library of expert adapters from real corpora, then answer one question per domain."""
    from loramix.quickstart import run_quickstart

    res = run_quickstart(home=home, base=base, steps=steps, quiet=as_json)
    if as_json:
        _print_json(res)

_SV = ServeSettings()


@app.command("serve")
def serve(home: Home = None, base: Base = None,
          host: Annotated[str, typer.Option("--host", help="Address to bind; a non-loopback one needs --api-keys.")] = _SV.host,
          port: Annotated[int, typer.Option("--port")] = _SV.port,
          api_keys: Annotated[Path | None, typer.Option("--api-keys", help='JSON file {"KEY": {"tenant": NAME, "admin": false}}.')] = None,
          max_batch: Annotated[int, typer.Option("--max-batch", help="Rows decoding together (1 = no batching).")] = _SV.max_batch,
          max_queue: Annotated[int, typer.Option("--max-queue", help="Waiting requests beyond this get 429.")] = _SV.max_queue,
          max_new_tokens_cap: Annotated[int, typer.Option("--max-new-tokens-cap", help="Requests asking more max_tokens get 400.")] = _SV.max_new_tokens_cap,
          default_max_tokens: Annotated[int, typer.Option("--default-max-tokens", help="max_tokens when a request gives none.")] = _SV.default_max_tokens,
          max_prompt_tokens: Annotated[int, typer.Option("--max-prompt-tokens", help="Longer prompts get 400.")] = _SV.max_prompt_tokens,
          max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="JSON request bodies above this get 413.")] = _SV.max_body_bytes,
          max_upload_bytes: Annotated[int, typer.Option("--max-upload-bytes", help="Adapter uploads above this get 413.")] = _SV.max_upload_bytes,
          request_timeout: Annotated[float, typer.Option("--request-timeout", help="Seconds a generation may run before it is cancelled.")] = _SV.request_timeout_s,
          max_concurrent_per_key: Annotated[int, typer.Option("--max-concurrent-per-key", help="Requests in flight per API key; more get 429.")] = _SV.max_concurrent_per_key,
          allow_lora_dir: Annotated[list[Path] | None, typer.Option("--allow-lora-dir", help="Folder /v1/load_lora_adapter may read from (repeatable).")] = None,
          served_model_name: Annotated[str | None, typer.Option("--served-model-name", help="The base model's id in /v1/models (default: its folder name).")] = None,
          capacity: Annotated[int, typer.Option("--capacity", help="Adapter slots kept loaded.")] = _M.capacity,
          bf16: Bf16 = False,
          log_level: Annotated[str, typer.Option("--log-level")] = "info") -> None:
    """Serve the library over HTTP for OpenAI and LoRAX clients (FastAPI + uvicorn), batching requests."""
    from loramix.serve.run import serve as run_serve

    settings = ServeSettings(host=host, port=port, api_keys=api_keys, max_batch=max_batch, max_queue=max_queue,
                             max_new_tokens_cap=max_new_tokens_cap, default_max_tokens=default_max_tokens,
                             max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
                             max_upload_bytes=max_upload_bytes, request_timeout_s=request_timeout,
                             max_concurrent_per_key=max_concurrent_per_key,
                             allow_lora_dirs=list(allow_lora_dir or []), served_model_name=served_model_name)
    run_serve(settings, home=home, base=base, mix=MixConfig(capacity=capacity, bf16=bf16), log_level=log_level)


def _fail(msg: str) -> None:
    sys.stderr.write(f"error: {one_line(msg, 1000)}\n")  # one line, however wide the terminal


from loramix.cli_scale import register as _register_scale  # noqa: E402  (import, compact, dedupe, prune, stats)

_register_scale(app, adapters_app)


def main() -> None:
    """The ``loramix`` entry point: errors as one line on stderr, and a prompt exit once the work is done.

    After a command returns (everything it wrote is committed), the process leaves with ``os._exit``
    after flushing: the interpreter's normal teardown of torch, transformers and sentence-transformers
    (freeing ~10^6 objects and unloading their native libraries) took about 1 s and does nothing useful.
    """
    import importlib

    exc = importlib.import_module(typer.BadParameter.__module__)  # click's exceptions (typer may bundle click)
    no_args = getattr(exc, "NoArgsIsHelpError", ())
    exits = (typer.Exit, getattr(exc, "Exit", typer.Exit))
    aborts = (typer.Abort, getattr(exc, "Abort", typer.Abort), KeyboardInterrupt)
    offline_env()  # before anything imports transformers
    code = 0
    try:
        rv = app(standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except LoramixError as e:
        _fail(f"{type(e).__name__}: {e}")
        code = 2
    except exits as e:
        code = int(getattr(e, "exit_code", 0) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except no_args:  # a bare group: typer has printed its help
        code = 2
    except exc.ClickException as e:  # usage errors: bad option, missing argument, bad value
        hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) is not None else ""
        _fail(e.format_message() + hint)
        code = e.exit_code
    except aborts:
        _fail("interrupted")
        code = 130
    except BrokenPipeError:
        code = 0
    except OSError as e:  # the environment, not a bug: unreadable or unwritable paths, a full disk
        _fail(f"{type(e).__name__}: {e}")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    import logging

    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
