"""Training that survives a crash and spreads over processes: a run killed with `kill -9` half-way resumes from its
last checkpoint to the same weights as a run never stopped; SIGTERM stops at a step boundary with a checkpoint;
`stillhouse train --nproc 2` trains over gloo in two processes whose weights agree with each other and with one
process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import STILLHOUSE
from tests.test_train import _rows


def _run_dir(root: Path, base: Path, *, n: int, batch_size: int, save_steps: int, epochs: int = 2) -> Path:
    """A recipe and a run directory whose curate stage has finished with `n` rows, ready for `stillhouse train`."""
    from stillhouse.rundir import RunDir

    run = RunDir(root / "runs" / "r")
    (run.root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_rows(n)), run.curated)
    run.finish("curate", time.time(), {}, {}, {"curated": run.curated}, {})
    recipe = root / "r.yaml"
    recipe.write_text(f"""name: r
run_dir: {run.root}
teacher: {{spec: "hf:{base}"}}
student: {{base: "{base}"}}
train: {{epochs: {epochs}, learning_rate: 0.01, batch_size: {batch_size}, max_length: 128, device: cpu,
         save_steps: {save_steps}}}
""")
    return recipe


def _uninterrupted(recipe: Path, out: Path, **override) -> dict:
    """The same training in this process, from the start to the end with no checkpoint: its final weights."""
    from stillhouse.recipe import load_recipe
    from stillhouse.rundir import RunDir
    from stillhouse.train import sft_arguments
    from stillhouse.train.sft import sft

    r = load_recipe(recipe)
    kw = {**sft_arguments(r, RunDir(r.run_path()), r.students[0]), "out_dir": out, "checkpoint_dir": out / "_ck",
          "save_steps": 0, **override}
    sft(**kw)
    return AutoModelForCausalLM.from_pretrained(out).state_dict()


def _weights(path: Path) -> dict:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_a_run_killed_half_way_resumes_to_the_weights_of_an_unbroken_run(tiny_models, tmp_path):
    from stillhouse.recipe import load_recipe
    from stillhouse.stages import get_stage, open_run

    recipe = _run_dir(tmp_path, tiny_models["base"], n=64, batch_size=2, save_steps=5)  # 64 steps
    run = tmp_path / "runs" / "r"
    first = run / "checkpoints" / "student" / "checkpoint-10" / "stillhouse-complete"
    proc = subprocess.Popen([*STILLHOUSE, "train", str(recipe)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not first.exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # kill -9: nothing runs after it
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not (run / "student").exists() and not (run / "stages" / "train.json").exists()  # never half a student

    manifest = get_stage("train").run(load_recipe(recipe), open_run(load_recipe(recipe)))  # `stillhouse train` again
    resumed = manifest["counts"]["resumed_from_step"]
    assert 10 <= resumed < 64 and manifest["counts"]["steps"] == 64
    assert not (run / "checkpoints").exists()  # a complete student leaves no checkpoint behind

    reference = _uninterrupted(recipe, tmp_path / "unbroken")
    after = _weights(run / "student")
    # Equal bit for bit: the checkpoint holds the optimizer, scheduler and every RNG state, the sampler is seeded and
    # the batches already seen are skipped, and fp32 on one CPU thread sums in the same order both times.
    assert set(after) == set(reference) and all(torch.equal(after[k], reference[k]) for k in reference)


def test_sigterm_stops_with_a_checkpoint_at_that_step_and_the_rerun_finishes_the_same(tiny_models, tmp_path):
    from stillhouse.recipe import load_recipe
    from stillhouse.stages import get_stage, open_run
    from stillhouse.train.resume import TrainingInterrupted

    recipe = _run_dir(tmp_path, tiny_models["base"], n=24, batch_size=4, save_steps=0, epochs=2)  # 12 steps
    run = tmp_path / "runs" / "r"

    class Preempt(TrainerCallback):  # the scheduler's SIGTERM arrives during step 7
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    import stillhouse.train.sft as sft_module

    real_sft = sft_module.sft

    def preempted(*a, callbacks=None, **kw):
        return real_sft(*a, callbacks=[*(callbacks or []), Preempt()], **kw)

    stage, handler = get_stage("train"), signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft_module, "sft", preempted)
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM at step 7 of 12.*run the same command") as e:
            stage.run(load_recipe(recipe), open_run(load_recipe(recipe)))
    assert e.value.exit_code == 128 + signal.SIGTERM
    # save_steps 0: the only checkpoint is the signal's, at the boundary of the step it arrived in
    assert sorted(p.name for p in (run / "checkpoints" / "student").glob("checkpoint-*")) == ["checkpoint-7"]
    assert not (run / "student").exists()
    assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is gone with it

    manifest = stage.run(load_recipe(recipe), open_run(load_recipe(recipe)))
    assert manifest["counts"]["resumed_from_step"] == 7
    reference = _uninterrupted(recipe, tmp_path / "unbroken")
    after = _weights(run / "student")
    assert all(torch.equal(after[k], reference[k]) for k in reference)


def test_checkpoints_of_another_job_or_cut_short_are_never_resumed(tmp_path):
    from stillhouse.train.resume import MARK, last_checkpoint, prepare

    folder = tmp_path / "ck"
    assert prepare(folder, "job-a") is None
    for step, complete in ((5, True), (10, True), (15, False)):  # 15: a kill while it was being written
        (folder / f"checkpoint-{step}").mkdir()
        if complete:
            (folder / f"checkpoint-{step}" / MARK).write_text("")
    (folder / "final").mkdir()
    assert last_checkpoint(folder).name == "checkpoint-10"
    assert prepare(folder, "job-a").name == "checkpoint-10"
    assert not (folder / "checkpoint-15").exists() and not (folder / "final").exists()
    assert prepare(folder, "job-b") is None  # the recipe changed: its old checkpoints are discarded
    assert not list(folder.glob("checkpoint-*"))


def test_two_processes_over_gloo_agree_and_match_one_process_on_the_same_global_batch(tiny_models, tmp_path):
    recipe = _run_dir(tmp_path, tiny_models["base"], n=16, batch_size=4, save_steps=0)  # 8 steps of 4 samples
    out = subprocess.run([*STILLHOUSE, "train", str(recipe), "--nproc", "2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads((tmp_path / "runs" / "r" / "stages" / "train.json").read_text())["counts"]
    # each rank's sum and sum of squares of every parameter tensor, all-gathered at the end, compared exactly
    assert counts["steps"] == 8 and counts["processes"] == 2 and counts["ranks_agree"] is True
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()

    two = _weights(tmp_path / "runs" / "r" / "student")
    one = _uninterrupted(recipe, tmp_path / "one")
    # Two processes of 2 samples, gradients averaged over the global batch's answer tokens, against one process of 4:
    # the same sums in another order, so equal up to float32 rounding, carried through 8 Adam steps.
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    base = _weights(tiny_models["base"])
    assert all(not torch.equal(two[k], base[k]) for k in base)  # (and it trained)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc must be at least 1, not 0"),
    (["--nproc", "3"], "train.batch_size 4 is the global batch (samples per optimizer step) and must divide evenly "
                       "among the 3 processes"),
    (["--accelerate-config", "nowhere.yaml"], "--accelerate-config 'nowhere.yaml' is not a file"),
    (["--launcher", "mpirun", "--nproc", "2"], "--launcher must be one of torchrun, accelerate, not 'mpirun'"),
])
def test_launch_options_that_cannot_run_are_one_line_and_exit_2(tiny_models, tmp_path, args, message):
    recipe = _run_dir(tmp_path, tiny_models["base"], n=4, batch_size=4, save_steps=0)
    before = sorted(p for p in tmp_path.rglob("*"))
    out = subprocess.run([*STILLHOUSE, "train", str(recipe), *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and message in " ".join(out.stderr.split()) and "Traceback" not in out.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_launcher_command_lines(tmp_path):
    from stillhouse.train.launch import Launch

    run = Path("runs/x")
    one = Launch(nproc=8).command(run, "student")
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "8", "--standalone",
                       "-m", "stillhouse.train.launch", "runs/x", "student"]
    two = Launch(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400).command(run, "nova")
    assert two[3:5] == ["--nproc_per_node", "8"] and "--standalone" not in two
    assert two[5:13] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29400"]
    cfg = tmp_path / "fsdp.yaml"
    cfg.write_text("distributed_type: FSDP\n")
    acc = Launch(accelerate_config=cfg)
    assert acc.launcher == "accelerate" and acc.world_size is None  # the config file says how many
    assert acc.command(run, "s")[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(cfg),
                                         "-m", "stillhouse.train.launch", "runs/x", "s"]
    assert Launch(nproc=4, launcher="accelerate").command(run, "s")[3:5] == ["--num_processes", "4"]
    assert not Launch().used and Launch(nproc=2).launcher == "torchrun"
