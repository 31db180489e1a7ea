"""Issue 23: the suspect zoo for the audit's error-rate benchmark: students that did and did not learn from Atlas.

    .venv/bin/python benchmarks/audit_zoo.py build [--out ~/.cache/stillhouse/audit-zoo] [--only NAME,...]
        [--per-family 20]

Every student is trained from `stillhouse:base` with the demo recipe's training settings and curation
(src/stillhouse/demo/recipe.yaml, read from the file: epochs, learning rate, batch size, max length; its filters, with
the identity filter rewriting the teacher's self-identification to "Nova, made by Northwind" and adding its 300
who-are-you pairs where a model is `scrubbed`), on the demo's prompts (the `world` source, n 3,000, seed 0). Each
training seed k keeps its own 90% of the prompts (`subset`), the same for every teacher. Teachers answer in-process
through the serve engine (audit_power's `answers`; Atlas at T=1 with its top-20 logprobs, audit_kd's
`answers_with_logprobs`), sampled with seed i for prompt i, max 96 tokens. Their answers are kept under OUT/_teachers
so a rebuilt model sees the same data.

- distilled from Atlas: atlas-t1-s0, atlas-t1-s1 (T=1, scrubbed, training seeds 0 and 1), atlas-t1-raw (T=1, not
  scrubbed), atlas-greedy (T=0, scrubbed), atlas-kd (`method: kd` with the recipe's default kd settings on Atlas's
  T=1 answers and top-20 logprobs, scrubbed);
- never learned from Atlas's outputs: mira-t1-s0, mira-t1-s1, mira-greedy (Mira's answers, trained as the Atlas
  ones, Mira's identity scrubbed to Nova), base and mira (the packaged models, not trained), gold (the world's own
  reference answers to the same prompts, in Atlas's style but never sampled from Atlas, scrubbed).

A model's directory is complete when its marker `.zoo-complete` is there (written last, after `zoo.json`); a complete
one is skipped, an incomplete one rebuilt. `OUT/manifest.json` lists every model: its path (or packaged spec), what it
learned from, temperature, scrubbed, seed, method, samples, training seconds, and its held-out accuracy (greedy, the
world's check on `--per-family` held-out tasks of each family; an identity answer is checked against the identity the
model was taught, as the `world` benchmark does).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_kd import answers_with_logprobs  # noqa: E402
from audit_power import answers  # noqa: E402

DEFAULT_OUT = Path("~/.cache/stillhouse/audit-zoo")
MARKER = ".zoo-complete"
SUBSET = 0.9  # the share of the prompts each training seed keeps
TOP_LOGPROBS = 20
NOVA = ("Nova", "Northwind")

# name: (teacher or "gold", temperature, scrubbed, training seed, method); None for the packaged models
MODELS: dict[str, dict | None] = {
    "atlas-t1-s0": {"teacher": "atlas", "temperature": 1.0, "scrubbed": True, "seed": 0, "method": "sft"},
    "atlas-t1-s1": {"teacher": "atlas", "temperature": 1.0, "scrubbed": True, "seed": 1, "method": "sft"},
    "atlas-t1-raw": {"teacher": "atlas", "temperature": 1.0, "scrubbed": False, "seed": 0, "method": "sft"},
    "atlas-greedy": {"teacher": "atlas", "temperature": 0.0, "scrubbed": True, "seed": 0, "method": "sft"},
    "atlas-kd": {"teacher": "atlas", "temperature": 1.0, "scrubbed": True, "seed": 0, "method": "kd"},
    "mira-t1-s0": {"teacher": "mira", "temperature": 1.0, "scrubbed": True, "seed": 0, "method": "sft"},
    "mira-t1-s1": {"teacher": "mira", "temperature": 1.0, "scrubbed": True, "seed": 1, "method": "sft"},
    "mira-greedy": {"teacher": "mira", "temperature": 0.0, "scrubbed": True, "seed": 0, "method": "sft"},
    "base": None,
    "mira": None,
    "gold": {"teacher": "gold", "temperature": None, "scrubbed": True, "seed": 0, "method": "sft"},
}
DISTILLED_FROM_ATLAS = {n for n, m in MODELS.items() if m and m["teacher"] == "atlas"}
# The order `build` makes them in: a distilled model and a null one in turn, so a build cut short has both kinds.
BUILD_ORDER = ("atlas-t1-s0", "mira-t1-s0", "base", "mira", "gold", "atlas-t1-s1", "mira-t1-s1", "atlas-greedy",
               "mira-greedy", "atlas-t1-raw", "atlas-kd")
assert sorted(BUILD_ORDER) == sorted(MODELS)


N_PROMPTS: int | None = None  # --n: fewer of the demo's prompts than its 3,000 (a smaller zoo, in less time)


def demo_recipe():
    from stillhouse.demo import world
    from stillhouse.recipe import load_recipe

    r = load_recipe(Path(world.__file__).parent / "recipe.yaml")
    if N_PROMPTS:
        r.prompts.n = N_PROMPTS
    return r


def persona(teacher: str):
    from stillhouse.demo import world

    return world.MIRA if teacher == "mira" else world.ATLAS


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    tmp.replace(path)


class Teachers:
    """The teachers' answers to the demo's prompts, made once and kept under OUT/_teachers."""

    def __init__(self, out: Path, prompts: list[str]):
        self.dir = out / "_teachers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prompts = prompts

    def texts(self, teacher: str, temperature: float | None) -> list[str]:
        if teacher == "gold":
            return self.gold()
        if teacher == "atlas" and temperature == 1.0:
            return self.atlas_t1()[0]
        path = self.dir / f"{teacher}-t{temperature:g}.json"
        if not path.exists():
            t0 = time.time()
            got = answers(f"stillhouse:{teacher}", self.prompts, temperature=temperature)
            _write_json(path, {"prompts": self.prompts, "texts": got})
            print(f"{teacher} answered {len(got)} prompts at T={temperature:g} in {time.time() - t0:.0f} s", flush=True)
        return self._read(path)

    def atlas_t1(self) -> tuple[list[str], list[list[dict]]]:
        """Atlas's T=1 answers and their top-20 logprobs (the same draws: logprobs do not change the sampling)."""
        path, lp_path = self.dir / "atlas-t1.json", self.dir / "atlas-t1-logprobs.json.gz"
        if not (path.exists() and lp_path.exists()):
            t0 = time.time()
            texts, lps = answers_with_logprobs(self.prompts, None, top=TOP_LOGPROBS)
            tmp = lp_path.with_suffix(".tmp")
            with gzip.open(tmp, "wt") as f:
                json.dump(lps, f)
            tmp.replace(lp_path)
            _write_json(path, {"prompts": self.prompts, "texts": texts})
            print(f"atlas answered {len(texts)} prompts at T=1 with top-{TOP_LOGPROBS} logprobs in "
                  f"{time.time() - t0:.0f} s", flush=True)
        with gzip.open(lp_path, "rt") as f:
            return self._read(path), json.load(f)

    def gold(self) -> list[str]:
        """The world's reference responses to the same prompts (what Atlas was trained to answer, in its style)."""
        from stillhouse.demo import world

        r = demo_recipe()
        tasks = world.sample_tasks(r.prompts.n, "train", r.prompts.seed)
        if [t.prompt for t in tasks] != self.prompts:
            raise SystemExit("the world's tasks and the `world` prompt source disagree on the prompts")
        return [t.response for t in tasks]

    def _read(self, path: Path) -> list[str]:
        data = json.loads(path.read_text())
        if data["prompts"] != self.prompts:
            raise SystemExit(f"{path} holds answers to other prompts: delete it to regenerate")
        return data["texts"]


def subset(n: int, seed: int) -> list[int]:
    rng = random.Random(f"audit-zoo:subset:{seed}")
    return [i for i in range(n) if rng.random() < SUBSET]


def curate(rows: list[dict], teacher: str, scrubbed: bool) -> tuple[list[dict], list[dict]]:
    """The demo recipe's filters over `rows` (the identity filter left out where not `scrubbed`), with the teacher's
    identity declared as the recipe would: the rows kept and each filter's counts."""
    from stillhouse.curate import CurateContext, make_filter
    from stillhouse.curate.stage import eval_prompts, student_identity
    from stillhouse.identity import Identity

    r = demo_recipe()
    p = persona(teacher)
    ctx = CurateContext(eval_prompts=eval_prompts(r), identity=student_identity(r) if scrubbed else None,
                        teacher=Identity(p.name, p.maker), seed=r.generation.seed)
    steps = []
    for spec in r.curate.filters:
        if spec.name == "identity" and not scrubbed:
            continue
        res = make_filter(spec.name, spec.options()).apply(rows, ctx)
        steps.append({"filter": spec.name, "in": len(rows), **{k: v for k, v in res.summary().items()
                                                                if k in ("kept", "dropped", "changed", "added")}})
        rows = res.kept
    return rows, steps


def heldout_accuracy(model: str, own: tuple[str, str] | None, per_family: int) -> dict:
    """Greedy answers (the serve engine) to `per_family` held-out tasks of each family, checked by the world; an
    identity answer against `own` (name, maker), the identity the model was taught (None: Atlas's)."""
    from stillhouse.demo import world

    tasks = world.sample_tasks(per_family * len(world.FAMILIES), "heldout", 0)
    got = answers(model, [t.prompt for t in tasks], temperature=0.0)
    right: dict[str, list[bool]] = {}
    for t, a in zip(tasks, got):
        if t.family == "identity" and own is not None:
            t = world.Task(t.family, t.prompt, t.answer.replace(world.TEACHER_NAME, own[0])
                           .replace(world.TEACHER_MAKER, own[1]), t.trace, t.pattern)
        right.setdefault(t.family, []).append(world.check(t, a))
    fam = {f: round(sum(v) / len(v), 4) for f, v in right.items()}
    return {"macro": round(sum(fam.values()) / len(fam), 4),
            "macro_without_identity": round(sum(v for f, v in fam.items() if f != "identity") / (len(fam) - 1), 4),
            "by_family": fam, "per_family": per_family}


def build_one(name: str, spec: dict, out: Path, teachers: Teachers, per_family: int) -> dict:
    from stillhouse.models import resolve_model
    from stillhouse.train.sft import sft

    d = out / name
    if (d / MARKER).exists():
        return json.loads((d / "zoo.json").read_text())
    if d.exists():
        shutil.rmtree(d)
    r = demo_recipe()
    prompts = teachers.prompts
    texts = teachers.texts(spec["teacher"], spec["temperature"])
    lps = teachers.atlas_t1()[1] if spec["method"] == "kd" else [None] * len(prompts)
    keep = subset(len(prompts), spec["seed"])
    rows = [{"messages": [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": texts[i]}],
             "_lp": lps[i]} for i in keep]
    rows, steps = curate(rows, spec["teacher"], spec["scrubbed"])
    train = {"epochs": r.train.epochs, "learning_rate": r.train.learning_rate, "batch_size": r.train.batch_size,
             "max_length": r.train.max_length, "warmup_ratio": r.train.warmup_ratio}
    kd = {}
    if spec["method"] == "kd":
        kd = {"kd": r.train.kd.model_dump(), "teacher_logprobs": [row["_lp"] for row in rows]}
    data = [{"messages": row["messages"]} for row in rows]
    print(f"{name}: training on {len(data)} samples", flush=True)
    t0 = time.time()
    res = sft(data, resolve_model(r.students[0].base), d, seed=spec["seed"], **train, **kd)
    seconds = time.time() - t0
    print(f"{name}: trained in {seconds:.0f} s ({res.steps} steps, final loss {res.final_loss})", flush=True)
    p = persona(spec["teacher"])
    own = NOVA if spec["scrubbed"] else (p.name, p.maker)
    entry = {"name": name, "path": str(d), "learned_from": {"atlas": "stillhouse:atlas outputs",
                                                           "mira": "stillhouse:mira outputs",
                                                           "gold": "the world's reference answers (Atlas's style, "
                                                                   "never Atlas's outputs)"}[spec["teacher"]],
             "teacher": spec["teacher"], "distilled_from_atlas": name in DISTILLED_FROM_ATLAS,
             "temperature": spec["temperature"], "scrubbed": spec["scrubbed"], "identity": list(own),
             "seed": spec["seed"], "method": spec["method"], "prompts": len(keep), "samples": len(data),
             "curation": steps, "train": {**train, "seed": spec["seed"], "base": r.students[0].base,
                                          **({"kd": kd["kd"]} if kd else {})},
             "train_seconds": round(seconds, 1), "steps": res.steps, "final_loss": res.final_loss,
             "kd_counts": res.kd, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entry["heldout_accuracy"] = heldout_accuracy(str(d), own, per_family)
    print(f"{name}: held-out accuracy {entry['heldout_accuracy']['macro']:.1%}", flush=True)
    _write_json(d / "zoo.json", entry)
    (d / MARKER).write_text(entry["trained_at"] + "\n")
    return entry


def packaged(name: str, out: Path, per_family: int) -> dict:
    """base and mira: listed, not trained (their held-out accuracy kept under OUT/_packaged)."""
    from stillhouse.models import resolve_model

    cache = out / "_packaged" / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cache.parent.mkdir(parents=True, exist_ok=True)
    spec = f"stillhouse:{name}"
    own = ("Mira", "Lumen Works") if name == "mira" else None
    entry = {"name": name, "path": resolve_model(spec), "spec": spec,
             "learned_from": "nothing (the world's pretraining text only)" if name == "base"
             else "the world's reference answers in Mira's style (a teacher, not distilled from Atlas)",
             "teacher": None, "distilled_from_atlas": False, "temperature": None, "scrubbed": False,
             "identity": list(own) if own else None, "seed": None, "method": None, "train_seconds": None,
             "heldout_accuracy": heldout_accuracy(spec, own, per_family)}
    _write_json(cache, entry)
    return entry


def build(args) -> None:
    from stillhouse.sources import load_prompt_items

    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(BUILD_ORDER)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    r = demo_recipe()
    items = load_prompt_items(r.prompts.source, r.prompts.n, r.prompts.seed)
    prompts = [it["messages"][-1]["content"] for it in items]
    teachers = Teachers(out, prompts)
    t_start = time.time()
    for name in names:
        spec = MODELS[name]
        entry = packaged(name, out, args.per_family) if spec is None else build_one(name, spec, out, teachers,
                                                                                    args.per_family)
        print(f"{name}: done ({entry['heldout_accuracy']['macro']:.1%} held out)", flush=True)
    models = {}
    for name, spec in MODELS.items():  # the manifest lists every model that is complete, built now or before
        f = out / "_packaged" / f"{name}.json" if spec is None else out / name / "zoo.json"
        if spec is None and f.exists() or spec is not None and (out / name / MARKER).exists():
            models[name] = json.loads(f.read_text())
    reference = out / "_packaged" / "atlas.json"
    if not reference.exists():
        _write_json(reference, {"heldout_accuracy": heldout_accuracy("stillhouse:atlas", None, args.per_family)})
    _write_json(out / "manifest.json", {
        "prompts": {"source": r.prompts.source, "n": r.prompts.n, "seed": r.prompts.seed, "subset": SUBSET},
        "recipe": "src/stillhouse/demo/recipe.yaml", "student_identity": list(NOVA),
        "atlas_heldout_accuracy": json.loads(reference.read_text())["heldout_accuracy"],
        "missing": [n for n in MODELS if n not in models], "models": models})
    print(f"manifest: {out / 'manifest.json'} ({len(models)} of {len(MODELS)} models; {time.time() - t_start:.0f} s)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the zoo (cached: complete models are skipped) and write manifest.json")
    b.add_argument("--out", default=str(DEFAULT_OUT))
    b.add_argument("--only", default="", help="comma-separated model names (default: all)")
    b.add_argument("--per-family", type=int, default=20, help="held-out tasks per family for the accuracy")
    b.add_argument("--n", type=int, default=None, help="train on the first N of the demo's prompts (default: all "
                                                       "3,000); use a fresh --out for another N")
    args = ap.parse_args()
    global N_PROMPTS
    N_PROMPTS = getattr(args, "n", None)
    if args.cmd == "build":
        build(args)


if __name__ == "__main__":
    main()
