"""Start-up and exit time of `loramix adapters list` and `loramix adapters add`, this tree vs a peer tree.

    python bench/startup.py --peer ../main/src --repeats 5

Each repeat runs every command once per tree, round-robin, in fresh processes on the tiny random base
(built here; nothing is downloaded). `exit_s` is the time from the command's work being done (its
function returned, or `os._exit` was called) to the process being gone, as seen by the parent.
Check: both trees list the same adapter after `add`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"

# runs the CLI like the console script; records when the work is done (main returned or os._exit called)
WRAPPER = """
import os, sys, time
stamp = sys.argv.pop(1)
real_exit = os._exit
def _exit(code):
    open(stamp, "w").write(repr(time.time()))
    real_exit(code)
os._exit = _exit
sys.argv[0] = "loramix"
from loramix.cli import main
try:
    main()
finally:
    open(stamp, "w").write(repr(time.time()))
"""


def run(src: Path, args: list[str], env: dict[str, str], tmp: Path) -> tuple[float, float, str]:
    stamp = tmp / "stamp"
    stamp.unlink(missing_ok=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(stamp), *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(src)})
    t1 = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"{src}: loramix {' '.join(args)} failed: {proc.stderr[-500:]}")
    done = float(stamp.read_text())
    return t1 - t0, t1 - done, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True, help="the other tree's src folder (e.g. the main branch's)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    trees = {"peer": Path(a.peer).resolve(), "this": HERE}
    tmp = Path(tempfile.mkdtemp(prefix="loramix-startup-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    setup = ("import sys, torch\n"
             "from peft import LoraConfig, get_peft_model\n"
             "from loramix.base import load_base\n"
             "from loramix.testing import build_tiny_base\n"
             "p = build_tiny_base(sys.argv[1])\n"
             "torch.manual_seed(0)\n"
             "m = get_peft_model(load_base(p).model, LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'],"
             " init_lora_weights=False))\n"
             "m.save_pretrained(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", setup, str(tmp / "base"), str(tmp / "adapter")], check=True, env={
        **env, "PYTHONPATH": str(HERE)}, capture_output=True)
    env["LORAMIX_BASE"] = str(tmp / "base")
    times: dict[str, dict[str, list[tuple[float, float]]]] = {t: {"list": [], "add": []} for t in trees}
    listed: dict[str, list[str]] = {}
    for i in range(a.repeats):
        for tree, src in trees.items():
            home = tmp / f"home-{tree}-{i}"
            e = {**env, "LORAMIX_HOME": str(home)}
            times[tree]["add"].append(run(src, ["adapters", "add", str(tmp / "adapter"), "--name", "a0"], e, tmp)[:2])
            wall, ex, out = run(src, ["adapters", "list", "--json"], e, tmp)
            times[tree]["list"].append((wall, ex))
            listed[tree] = [r["name"] for r in json.loads(out)]
    assert listed["peer"] == listed["this"] == ["a0"], listed
    summary: dict[str, dict[str, float]] = {}
    for tree in trees:
        for cmd in ("list", "add"):
            walls = [w for w, _ in times[tree][cmd]]
            exits = [x for _, x in times[tree][cmd]]
            summary[f"{tree}_{cmd}"] = {"median_s": round(statistics.median(walls), 3), "min_s": round(min(walls), 3),
                                        "exit_median_s": round(statistics.median(exits), 3)}
            print(f"{tree:5s} {cmd:5s} median {statistics.median(walls):6.2f} s  min {min(walls):6.2f} s  "
                  f"exit (work done -> process gone) median {statistics.median(exits):5.2f} s")
    print(f"command: python bench/startup.py --peer {a.peer} --repeats {a.repeats}; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(json.dumps({"repeats": a.repeats, "cpu_count": os.cpu_count(), **summary}))


if __name__ == "__main__":
    main()
