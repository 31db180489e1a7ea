"""One `stillhouse run` on a tiny recipe, end to end, through the real CLI in a subprocess."""

import json
import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from tests.conftest import STILLHOUSE


@pytest.fixture(scope="module")
def finished_run(tiny_models, tmp_path_factory):
    """A run with two students (the second with its own training settings) and a control model."""
    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""name: tiny
teacher: {{spec: "hf:{tiny_models['teacher']}"}}
prompts: {{source: world, n: 12}}
curate: {{filters: [{{name: exact_dedup}}, {{name: decontaminate}}]}}  # (a random tiny teacher's answers are blank)
generation: {{max_tokens: 12}}
students:
  - {{name: student, base: "{tiny_models['base']}"}}
  - {{name: slow, base: "{tiny_models['base']}", train: {{epochs: 1, learning_rate: 0.0001, batch_size: 4, max_length: 128}}}}
controls:
  - {{name: ctrl, model: "{tiny_models['base']}"}}
train: {{epochs: 6, learning_rate: 0.003, batch_size: 4, max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 12}}
""")
    out = subprocess.run([*STILLHOUSE, "run", str(recipe)], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, root / "runs" / "tiny", recipe, out


def test_run_writes_the_run_directory(finished_run):
    root, run, _, out = finished_run
    for rel in ("recipe.yaml", "data/generated.parquet", "student/config.json", "student/model.safetensors",
                "student/README.md", "students/slow/model.safetensors", "students/slow/README.md",
                "eval/results.json", "eval/samples.jsonl", "report.html"):
        assert (run / rel).is_file(), rel
    for stage in ("generate", "train", "evaluate", "report"):
        m = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert m["stage"] == stage and 0 < m["seconds"] < 300 and m["finished"] >= m["started"]
    assert "share of teacher kept" in out.stderr and "report.html" in out.stderr
    train = json.loads((run / "stages" / "train.json").read_text())
    # 12 samples, batch 4: 3 steps an epoch
    assert train["counts"]["students"]["student"]["steps"] == 18 and train["counts"]["students"]["slow"]["steps"] == 3


def test_generated_rows_have_messages_and_provenance(finished_run):
    _, run, _, _ = finished_run
    rows = pq.read_table(run / "data" / "generated.parquet").to_pylist()
    assert len(rows) == 12
    r = rows[0]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    for col in ("teacher_backend", "teacher_model", "reported_model", "system_fingerprint", "sampling_params",
                "generation_method", "prompt_template_hash", "ledger_key", "created_at", "sample_index"):
        assert r[col] is not None, col
    assert len({r["ledger_key"] for r in rows}) == 12
    assert all(0 < x["completion_tokens"] <= 12 and x["prompt_tokens"] > 5 for x in rows)
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(run / "data" / "generated.parquet"), split="train")
    assert ds.num_rows == 12


def test_results_list_every_model_with_its_role(finished_run):
    _, run, _, _ = finished_run
    res = json.loads((run / "eval" / "results.json").read_text())
    roles = {m["name"]: m["role"] for m in res["models"]}
    assert roles == {"teacher": "teacher", "base": "base", "student": "student", "slow": "student", "ctrl": "control"}
    n = len(res["families"])  # one item of each world family
    assert n >= 6 and res["items"] == n and all(len(m["accuracy_by_family"]) == n for m in res["models"])
    assert all(m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1] for m in res["models"])
    by = {m["name"]: m for m in res["models"]}
    assert by["student"]["parameters"] == by["base"]["parameters"] == by["slow"]["parameters"] > 0
    lines = [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == n and all(x["prompt_hash"].startswith("sha256:") for x in lines)
    assert all(f"{name}_{k}" in lines[0] for name in roles for k in ("output", "answer", "correct"))


def _completion_token_accuracy(model_dir, rows) -> float:
    """Teacher-forced next-token accuracy on the assistant turns of `rows`: how well a model reproduces them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hit = total = 0
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1)
        target = torch.tensor(ids[len(p_ids):])
        hit += int((pred[len(p_ids) - 1:len(ids) - 1] == target).sum())
        total += len(target)
    return hit / total


def test_the_student_learned_its_training_data(finished_run, tiny_models):
    """Distillation did something: the student reproduces the teacher's answers better than its base does."""
    _, run, _, _ = finished_run
    rows = pq.read_table(run / "data" / "generated.parquet").to_pylist()
    base = _completion_token_accuracy(tiny_models["base"], rows)
    student = _completion_token_accuracy(run / "student", rows)
    assert student > base + 0.2, (student, base)


def test_rerun_skips_finished_stages_and_force_redoes(finished_run):
    root, run, recipe, _ = finished_run
    before = {s: json.loads((run / "stages" / f"{s}.json").read_text())["finished"] for s in ("generate", "train", "evaluate")}
    out = subprocess.run([*STILLHOUSE, "run", str(recipe)], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "generate: already finished" in out.stderr and "train: already finished" in out.stderr
    after = {s: json.loads((run / "stages" / f"{s}.json").read_text())["finished"] for s in before}
    assert after == before
    out = subprocess.run([*STILLHOUSE, "generate", str(recipe), "--force"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0
    assert json.loads((run / "stages" / "generate.json").read_text())["finished"] > before["generate"]


def test_stage_without_its_input_says_what_to_run(tmp_path, tiny_models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: lonely\nteacher: {{spec: 'hf:{tiny_models['teacher']}'}}\nstudent: {{base: '{tiny_models['base']}'}}\n")
    out = subprocess.run([*STILLHOUSE, "train", str(recipe)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "run `stillhouse curate` first" in out.stderr and "Traceback" not in out.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("STILLHOUSE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium not installed")
    _, run, _, _ = finished_run
    res = json.loads((run / "eval" / "results.json").read_text())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run / "report.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'id="chart-relative"' in dom and 'id="chart-tasks"' in dom and "data:image/png;base64," in dom
    acc = {m["name"]: m["accuracy"] for m in res["models"]}
    assert f"{100 * acc['teacher']:.1f}%" in dom and f"{100 * acc['student']:.1f}%" in dom
    assert "Stage timings" in dom and "generate" in dom
    for name in ("slow", "ctrl"):  # every model in the run is drawn, whatever its name and role
        assert f"<td>{name}</td>" in dom
    # the report stage saved the whole page's screenshot beside it, 1280 px wide
    from PIL import Image

    img = Image.open(run / "report.png").convert("RGB")
    assert img.size[0] == 1280 and img.size[1] > 1500
    colors = {c for _, c in img.getcolors(maxcolors=1 << 24)}
    # the teacher's bars (orange) are drawn: the chart images really rendered on the page
    assert any(abs(r - 0xF2) < 8 and abs(g - 0x99) < 8 and abs(b - 0x4A) < 8 for r, g, b in colors)


def test_model_card_and_ledger_cli(finished_run):
    root, run, recipe, _ = finished_run
    card = (run / "student" / "README.md").read_text()
    assert "Teacher's terms: **Unknown terms**" in card and "intended use: **research**" in card
    out = subprocess.run([*STILLHOUSE, "ledger", "stats", str(recipe), "--json"], cwd=root, capture_output=True, text=True)
    st = json.loads(out.stdout)
    n = json.loads((run / "eval" / "results.json").read_text())["items"]
    # 12 answers for training, then n evaluation answers from each of 5 models (teacher, base, two students, the
    # control, which is the base again and so answers from the cache): every model call is in the ledger, once
    assert sum(p["calls"] for p in st["by_stage_model"] if p["stage"] == "generate") == 12
    assert sum(p["calls"] for p in st["by_stage_model"] if p["stage"] == "evaluate") == n * 4
    assert st["sessions"]["calls_made"] == 12 + n * 4 and st["failed"] == 0
    out = subprocess.run([*STILLHOUSE, "ledger", "export", str(run)], cwd=root, capture_output=True, text=True)
    assert len(out.stdout.splitlines()) == 12 + n * 4 and json.loads(out.stdout.splitlines()[0])["stage"] == "generate"
    out = subprocess.run([*STILLHOUSE, "ledger", "path", str(run)], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip().endswith("ledger.db")


def test_served_teacher_path_through_a_real_server(tiny_models, tmp_path):
    """The demo's served-teacher path in miniature: a teacher behind `stillhouse serve` (own process), generate over HTTP."""
    from tests.conftest import generate
    from stillhouse.stages import open_run
    from stillhouse.recipe import parse_recipe
    from stillhouse.serve import subprocess_server

    with subprocess_server(str(tiny_models["teacher"]), "--model-name", "t") as url:
        r = parse_recipe(f"name: s\nrun_dir: {tmp_path / 'run'}\nteacher:\n  spec: openai:t\n  options: {{base_url: {url}, "
                         f"api_key_required: false}}\nprompts: {{n: 6}}\ngeneration: {{max_tokens: 5}}\nstudent: {{base: x}}\n")
        m = generate(r, open_run(r))
    assert m["counts"]["calls_made"] == 6
    rows = pq.read_table(tmp_path / "run" / "data" / "generated.parquet").to_pylist()
    assert {x["reported_model"] for x in rows} == {"t"} and rows[0]["system_fingerprint"].startswith("fp_")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_served_teacher_is_stopped_when_the_run_fails_or_is_interrupted(tiny_models, exc):
    """What `stillhouse demo` relies on: leaving `subprocess_server` any way stops the server process."""
    import httpx

    from stillhouse.serve import subprocess_server

    with pytest.raises(exc):
        with subprocess_server(str(tiny_models["teacher"]), "--model-name", "t") as url:
            assert httpx.get(url + "/models", timeout=10).status_code == 200
            raise exc()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models", timeout=5)
