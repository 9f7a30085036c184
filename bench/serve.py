"""Serving throughput and latency of `loramix serve` under concurrent clients, in one run.

Two real servers on loopback over the same library and base model (default SmolLM2-135M-Instruct):
one batching (--max-batch 32) and one not (--max-batch 1). The library holds --adapters SYNTHETIC
adapters (random rank-8 LoRAs on all seven projections of the top half of the layers, A and B drawn
with std 0.02, alpha 16, as bench/mix_throughput.py makes; not trained). Each request streams a chat
completion of exactly --new-tokens tokens (ignore_eos) under its own explicit 3-adapter mixture.
Settings, timed round-robin over --repeats rounds (each round runs every setting once):

  c1, c4, c16, c32   1/4/16/32 concurrent clients, mixtures, batching server
  c16_nobatch        16 clients, mixtures, the --max-batch 1 server
  c16_base           16 clients, base model only, batching server

Every adapter is loaded into both servers once before timing (a 1-token request per 3 adapters).
Per setting: aggregate generated tokens/s (all tokens / wall time), p50/p99 request latency and p50
time to first token. Before timing, a parity check: a greedy mixture request alone must give the same
tokens as the same request among 15 concurrent others (batched), and as on the no-batch server.
``--seconds S`` adds a soak: 32 clients for S seconds on the batching server, counting errors and the
server's RSS at start and end. The last line is one JSON object.

Run: ``python bench/serve.py [--json] [--repeats 1] [--adapters 24] [--seconds 600] [--base PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["Explain how plants turn light into sugar.", "What is a pointer in C?", "Tell me about the book of Psalms.",
           "How does a contract become binding?", "Describe the water cycle.", "Why is the sky blue?"]


def build_library(home: Path, base: str | None, n: int, rank: int) -> list[str]:
    from loramix.app import Loramix
    from loramix.testing import random_lora

    lm = Loramix(home=home, base=base)
    n_layers = lm.base.model.config.num_hidden_layers
    names = []
    for i in range(n):
        w = random_lora(lm.base, rank=rank, alpha=2.0 * rank, seed=i, targets=TARGETS, std=0.02)
        w.layers = {p: v for p, v in w.layers.items() if int(p.split(".")[2]) >= n_layers // 2}
        name = f"synthetic-{i:02d}"
        lm.add_weights(w, name, description=f"synthetic adapter {i}", examples=[PROMPTS[i % len(PROMPTS)]])
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`loramix serve` in a subprocess."""

    def __init__(self, home: Path, base: str | None, max_batch: int, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "loramix.cli", "serve", "--home", str(home), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-new-tokens-cap", "512", "--log-level", "warning"]
        if base:
            cmd += ["--base", base]
        self.cmd = " ".join(shlex.quote(c) for c in cmd)
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"server did not start; see {log}")
            time.sleep(0.2)
        self.ready_s = time.monotonic() - t0

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one(c: httpx.AsyncClient, model: str, prompt: str, new_tokens: int,
              temperature: float = 0.0) -> dict[str, Any]:
    """One streamed chat request: latency, time to first token, tokens, text."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": temperature, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage, error = None, "", None, None
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                error = ev["error"]
                continue
            if ev.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += ev["choices"][0].get("delta", {}).get("content") or ""
            if ev.get("usage"):
                usage = ev["usage"]
    if error or usage is None:
        return {"error": str(error or "no usage chunk")}
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": usage["completion_tokens"], "text": text}


def mixture(rng: random.Random, names: list[str]) -> str:
    picks = rng.sample(names, 3)
    return ",".join(f"{n}:{w}" for n, w in zip(picks, (0.5, 0.3, 0.2), strict=True))


async def run_setting(url: str, clients: int, per_client: int, names: list[str] | None, new_tokens: int,
                      seed: int) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another."""
    results: list[dict[str, Any]] = []

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
            for _ in range(per_client):
                model = mixture(rng, names) if names else ""
                try:
                    results.append(await one(c, model, rng.choice(PROMPTS), new_tokens))
                except Exception as e:  # noqa: BLE001 - counted as an error
                    results.append({"error": f"{type(e).__name__}: {e}"})

    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    return {"wall": wall, "tokens": sum(r["tokens"] for r in ok), "latencies": [r["latency"] for r in ok],
            "ttfts": [r["ttft"] for r in ok], "errors": [r["error"] for r in results if "error" in r]}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def parity(batched: str, nobatch: str, names: list[str], new_tokens: int) -> bool:
    """Greedy: alone == among 15 concurrent others (batched) == on the no-batch server."""
    model, prompt = f"{names[0]}:0.5,{names[1]}:0.3,{names[2]}:0.2", PROMPTS[0]
    async with httpx.AsyncClient(base_url=batched, timeout=3600) as c, \
            httpx.AsyncClient(base_url=nobatch, timeout=3600) as c2:
        alone = (await one(c, model, prompt, new_tokens))["text"]
        rng = random.Random(7)
        crowd = await asyncio.gather(one(c, model, prompt, new_tokens),
                                     *[one(c, mixture(rng, names), rng.choice(PROMPTS), new_tokens) for _ in range(15)])
        serial = (await one(c2, model, prompt, new_tokens))["text"]
    return bool(alone) and alone == crowd[0].get("text") == serial


async def warm(batched: str, nobatch: str, names: list[str]) -> None:
    """Load every adapter into both servers' slots once (one 1-token request per 3 adapters), so that
    the timed settings measure serving, not first loads."""
    for url in (batched, nobatch):
        async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
            for i in range(0, len(names), 3):
                group = names[i:i + 3]
                await one(c, ",".join(f"{n}:{1 / len(group)}" for n in group), PROMPTS[0], 1)


async def soak(url: str, names: list[str], seconds: float, new_tokens: int) -> dict[str, Any]:
    errors: list[str] = []
    tokens = 0
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal tokens
        rng = random.Random(10_000 + i)
        async with httpx.AsyncClient(base_url=url, timeout=3600) as c:
            while time.monotonic() < deadline:
                try:
                    r = await one(c, mixture(rng, names) if rng.random() < 0.8 else "", rng.choice(PROMPTS), new_tokens,
                                  temperature=rng.choice([0.0, 0.7]))
                except Exception as e:  # noqa: BLE001
                    r = {"error": f"{type(e).__name__}: {e}"}
                if "error" in r:
                    errors.append(r["error"])
                else:
                    tokens += r["tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(32)])
    return {"soak_seconds": round(time.perf_counter() - t0, 1), "soak_errors": len(errors),
            "soak_tok_s": round(tokens / (time.perf_counter() - t0), 2), "soak_error_samples": errors[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all settings (round-robin)")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends per setting")
    ap.add_argument("--adapters", type=int, default=24)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,16,32", help="client counts for the mixture settings")
    ap.add_argument("--seconds", type=float, default=0.0, help="also soak 32 clients for this long")
    ap.add_argument("--base", default=None, help="base model folder (default SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loramix-bench-serve-"))
    home = tmp / "home"
    t0 = time.perf_counter()
    names = build_library(home, args.base, args.adapters, args.rank)
    print(f"library: {len(names)} synthetic rank-{args.rank} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    batched = Server(home, args.base, 32, tmp / "batched.log")
    nobatch = Server(home, args.base, 1, tmp / "nobatch.log")
    print(f"servers ready in {batched.ready_s:.1f} s / {nobatch.ready_s:.1f} s:\n  {batched.cmd}\n  {nobatch.cmd}",
          flush=True)
    out: dict[str, Any] = {"adapters": len(names), "new_tokens": args.new_tokens, "rss_mb_start": round(batched.rss_mb(), 1)}
    try:
        asyncio.run(warm(batched.url, nobatch.url, names))
        ok = asyncio.run(parity(batched.url, nobatch.url, names, args.new_tokens))
        out["parity_batched_equals_alone"] = ok
        print(f"parity (greedy alone == in a batch of 16 == no-batch server): {'OK' if ok else 'MISMATCH'}", flush=True)
        settings: dict[str, tuple[str, int, bool]] = {f"c{n}": (batched.url, int(n), True)
                                                      for n in args.clients.split(",")}
        settings["c16_nobatch"] = (nobatch.url, 16, True)
        settings["c16_base"] = (batched.url, 16, False)
        acc: dict[str, dict[str, Any]] = {k: {"wall": 0.0, "tokens": 0, "latencies": [], "ttfts": [], "errors": []}
                                          for k in settings}
        for rep in range(args.repeats):
            for key, (url, clients, mixed) in settings.items():
                r = asyncio.run(run_setting(url, clients, args.per_client, names if mixed else None,
                                            args.new_tokens, seed=rep))
                a = acc[key]
                a["wall"] += r["wall"]
                a["tokens"] += r["tokens"]
                for f in ("latencies", "ttfts", "errors"):
                    a[f] += r[f]
                print(f"  round {rep + 1} {key:<12} {r['tokens'] / r['wall']:8.1f} tok/s "
                      f"({len(r['errors'])} errors)", flush=True)
        print(f"\n{args.new_tokens} new tokens per request, {args.per_client} requests per client, "
              f"{args.repeats} round(s), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
        print(f"  {'setting':<12} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ttft p50':>9} errors")
        errors = 0
        for key, a in acc.items():
            tok_s = a["tokens"] / a["wall"] if a["wall"] else 0.0
            p50, p99, t50 = (1000 * pct(a["latencies"], 0.5), 1000 * pct(a["latencies"], 0.99),
                             1000 * pct(a["ttfts"], 0.5))
            errors += len(a["errors"])
            print(f"  {key:<12} {tok_s:8.1f} {p50:8.0f} {p99:8.0f} {t50:9.0f} {len(a['errors'])}")
            name = key.removeprefix("c")
            out[f"tok_s_{name}"] = round(tok_s, 2)
            if key.startswith("c16"):
                sfx = name.removeprefix("16")
                out[f"p50_ms_16{sfx}"], out[f"p99_ms_16{sfx}"] = round(p50, 1), round(p99, 1)
                out[f"ttft_p50_ms_16{sfx}"] = round(t50, 1)
        out["errors"] = errors
        if "tok_s_16" in out:
            out["batching_speedup_16"] = round(out["tok_s_16"] / max(out["tok_s_16_nobatch"], 1e-9), 2)
            out["mix_vs_base_16"] = round(out["tok_s_16"] / max(out["tok_s_16_base"], 1e-9), 3)
            print(f"  targets: tok_s_16 >= 5x nobatch -> {out['batching_speedup_16']}x; "
                  f"mixtures >= 0.85x base-only -> {out['mix_vs_base_16']}x")
        if args.seconds > 0:
            s = asyncio.run(soak(batched.url, names, args.seconds, args.new_tokens))
            out.update(s)
            print(f"  soak: 32 clients for {s['soak_seconds']} s: {s['soak_tok_s']} tok/s, {s['soak_errors']} errors")
        out["rss_mb_end"] = round(batched.rss_mb(), 1)
        print(f"  server RSS: {out['rss_mb_start']} MB at start, {out['rss_mb_end']} MB at end")
    finally:
        batched.stop()
        nobatch.stop()
    print("command: python bench/serve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
