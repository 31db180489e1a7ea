"""What a run's files say, read once for every section: results, stage manifests, the recipe as run.

`eval/results.json` is read defensively: a key a newer evaluate writes (confidence intervals,
the judge, costs, pass@k) may be missing from an older run, and the sections then leave the
number out or say n/a.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from urllib.parse import urlparse

from stillhouse.report import charts
from stillhouse.report.fmt import interval, num
from stillhouse.rundir import RunDir

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


@dataclass
class Run:
    """The run's files, read once: results, manifests, the recipe as run, and derived facts the sections share."""

    run: RunDir
    res: dict
    name: str
    teacher_spec: str
    teacher_local: bool
    models: list[dict]
    colors: dict[str, str]
    timings: dict[str, float]
    manifests: dict[str, dict] = field(default_factory=dict)

    @property
    def teacher(self) -> dict | None:
        return next((m for m in self.models if m.get("role") == "teacher"), None)

    @property
    def students(self) -> list[dict]:
        return [m for m in self.models if m.get("role") == "student"]

    @property
    def others(self) -> list[dict]:
        """Every model but the teacher: students, controls, bases."""
        return [m for m in self.models if m.get("role") != "teacher"]

    @property
    def families(self) -> list[str]:
        fams = self.res.get("families")
        if isinstance(fams, list) and fams:
            return [str(f) for f in fams]
        return sorted({f for m in self.models for f in (m.get("accuracy_by_family") or {})})

    @property
    def confidence(self) -> str:
        c = num(self.res.get("confidence"))
        return f"{100 * c:.0f}%" if c is not None else "95%"

    @property
    def judge(self) -> dict | None:
        j = self.res.get("judge")
        return j if isinstance(j, dict) else None

    def pair(self, model: str) -> dict | None:
        """The judge's comparison of `model` with the teacher, if the judge ran one."""
        for p in (self.judge or {}).get("pairs") or []:
            if isinstance(p, dict) and p.get("model") == model:
                return p
        return None

    def cost(self) -> dict:
        """Teacher and judge spend: results.json's `cost`, else the generate stage's counts (older runs)."""
        c = dict(self.res.get("cost") or {})
        g = self.manifests.get("generate", {}).get("counts", {})
        if "teacher_usd" not in c and g:
            c["teacher_usd"] = g.get("cost_usd")
        if "teacher_calls" not in c and g:
            c["teacher_calls"] = g.get("calls_made")
        if "teacher_tokens" not in c and g:
            c["teacher_tokens"] = (g.get("prompt_tokens") or 0) + (g.get("completion_tokens") or 0) or None
        return c

    def train_seconds(self, m: dict) -> float | None:
        s = num(m.get("train_seconds"))
        if s is None:
            s = num((self.manifests.get("train", {}).get("counts", {}).get("students") or {})
                    .get(m["name"], {}).get("train_seconds"))
        return s

    def label(self, m: dict) -> str:
        return m["name"] if m["name"] == m.get("role") else f"{m['name']} ({m.get('role', '?')})"


def read_run(run: RunDir, recipe=None) -> Run:
    """Everything the sections need, from the run directory (and the recipe object, when the stage has one)."""
    res = json.loads(run.results.read_text())
    models = [m for m in res.get("models") or [] if isinstance(m, dict) and "name" in m]
    for m in models:
        m["name"] = str(m["name"])
    models.sort(key=lambda m: charts.ROLE_ORDER.get(m.get("role"), 9))
    info = _recipe_info(run, recipe)
    manifests = {m["stage"]: m for m in run.manifests() if isinstance(m, dict) and "stage" in m}
    timings = {k: float(v) for k, v in run.timings().items() if num(v) is not None}
    teacher = next((m for m in models if m.get("role") == "teacher"), {})
    spec = info.get("spec") or teacher.get("spec") or "n/a"
    return Run(run=run, res=res, name=str(info.get("name") or run.root.name), teacher_spec=str(spec),
               teacher_local=_is_local(str(spec), info.get("options") or {}), models=models,
               colors=charts.model_colors(models), timings=timings, manifests=manifests)


def _recipe_info(run: RunDir, recipe) -> dict:
    if recipe is not None:
        t = recipe.teacher
        return {"name": recipe.name, "spec": t.spec, "options": dict(t.options or {})}
    try:
        import yaml

        doc = yaml.safe_load(run.recipe.read_text()) or {}
        t = doc.get("teacher") or {}
        return {"name": doc.get("name"), "spec": t.get("spec"), "options": t.get("options") or {}}
    except Exception:  # a missing or malformed recipe.yaml must not stop the report: the name comes from the directory
        return {}


def _is_local(spec: str, options: dict) -> bool:
    """A teacher on this machine: a local model backend, or an OpenAI-compatible server on a local address."""
    if spec.split(":", 1)[0] == "hf":
        return True
    base = options.get("base_url") if isinstance(options, dict) else None
    return bool(base) and urlparse(str(base)).hostname in LOCAL_HOSTS


def preference(pair: dict, confidence: float = 0.95) -> tuple[float, tuple[float, float] | None] | None:
    """The judged standing of a model against the teacher: (win + ½ tie) / 50%, 1.0 = parity with the teacher.

    Its interval: `preference_ci` when the evaluate stage gives one, else the normal approximation for the mean of
    per-comparison scores in {1, ½, 0} over the pair's items."""
    w, t = num(pair.get("win")), num(pair.get("tie"))
    if w is None or t is None:
        return None
    s = w + t / 2
    ci = interval(pair.get("preference_ci"))
    if ci is not None:
        return 2 * s, (2 * ci[0], 2 * ci[1])
    n = pair.get("items")
    if isinstance(n, int) and n > 0:
        var = max(0.0, w + t / 4 - s * s)
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(var / n)
        return 2 * s, (2 * max(0.0, s - half), 2 * min(1.0, s + half))
    return 2 * s, None


