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
    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""name: tiny
teacher: {{spec: "hf:{tiny_models['teacher']}"}}
prompts: {{source: world, n: 12}}
generation: {{max_tokens: 12}}
student: {{base: "{tiny_models['base']}"}}
train: {{epochs: 1, learning_rate: 0.003, batch_size: 4, max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 12}}
""")
    out = subprocess.run([*STILLHOUSE, "run", str(recipe)], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, root / "runs" / "tiny", recipe, out


def test_run_writes_the_run_directory(finished_run):
    root, run, _, out = finished_run
    for rel in ("recipe.yaml", "data/generated.parquet", "student/config.json", "student/model.safetensors",
                "student/README.md", "eval/results.json", "eval/samples.jsonl", "report.html"):
        assert (run / rel).is_file(), rel
    for stage in ("generate", "train", "evaluate", "report"):
        m = json.loads((run / "stages" / f"{stage}.json").read_text())
        assert m["stage"] == stage and m["seconds"] >= 0
    assert "share kept" in out.stderr and "report.html" in out.stderr


def test_generated_rows_have_messages_and_provenance(finished_run):
    _, run, _, _ = finished_run
    rows = pq.read_table(run / "data" / "generated.parquet").to_pylist()
    assert len(rows) == 12
    r = rows[0]
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    for col in ("teacher_backend", "teacher_model", "reported_model", "system_fingerprint", "sampling_params",
                "prompt_template_hash", "ledger_key", "created_at", "sample_index"):
        assert r[col] is not None, col
    assert len({r["ledger_key"] for r in rows}) == 12
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(run / "data" / "generated.parquet"), split="train")
    assert ds.num_rows == 12


def test_results_and_samples(finished_run):
    _, run, _, _ = finished_run
    res = json.loads((run / "eval" / "results.json").read_text())
    assert set(res["accuracy"]) == {"teacher", "base", "student"} and res["items"] == 6
    assert len(res["accuracy_by_family"]["student"]) == 6
    lines = [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(x["prompt_hash"].startswith("sha256:") for x in lines)
    assert res["parameters"]["student"] == res["parameters"]["base"] > 0


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
    assert out.returncode == 2 and "run `stillhouse generate` first" in out.stderr and "Traceback" not in out.stderr


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
    assert 'id="chart"' in dom and "data:image/png;base64," in dom
    assert f"{100 * res['accuracy']['teacher']:.1f}%" in dom and f"{100 * res['accuracy']['student']:.1f}%" in dom
    assert "Stage timings" in dom and "generate" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", url],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = {c for _, c in img.getcolors(maxcolors=1 << 24)}
    # the teacher's bars (orange) are drawn: the chart image really rendered on the page
    assert any(abs(r - 0xF2) < 8 and abs(g - 0x99) < 8 and abs(b - 0x4A) < 8 for r, g, b in colors)


def test_model_card_and_ledger_cli(finished_run):
    root, run, recipe, _ = finished_run
    card = (run / "student" / "README.md").read_text()
    assert "Teacher's terms: **Unknown terms**" in card and "intended use: **research**" in card
    out = subprocess.run([*STILLHOUSE, "ledger", "stats", str(recipe), "--json"], cwd=root, capture_output=True, text=True)
    st = json.loads(out.stdout)
    # 12 answers for training and 6 for the teacher's evaluation: every teacher call is in the ledger, once
    assert {(p["stage"], p["calls"]) for p in st["by_stage_model"]} == {("generate", 12), ("evaluate", 6)}
    assert st["sessions"]["calls_made"] == 18
    out = subprocess.run([*STILLHOUSE, "ledger", "export", str(run)], cwd=root, capture_output=True, text=True)
    assert len(out.stdout.splitlines()) == 18 and json.loads(out.stdout.splitlines()[0])["stage"] == "generate"
    out = subprocess.run([*STILLHOUSE, "ledger", "path", str(run)], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip().endswith("ledger.db")


def test_served_teacher_path_through_a_real_server(tiny_models, tmp_path):
    """The demo's served-teacher path in miniature: a teacher behind `stillhouse serve` (own process), generate over HTTP."""
    from stillhouse.generate import generate
    from stillhouse.pipeline import open_run
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
