import time

from stillhouse.rundir import RunDir, canonical_json, hash_path, tagged_hash


def test_tagged_hash_is_canonical():
    assert tagged_hash({"b": 1, "a": [1, 2]}) == tagged_hash({"a": [1, 2], "b": 1})
    assert tagged_hash({"a": 1}).startswith("sha256:") and tagged_hash({"a": 1}) != tagged_hash({"a": 2})
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_manifest_written_last_and_half_written_stage_is_not_done(tmp_path):
    run = RunDir(tmp_path)
    out = tmp_path / "data" / "x.txt"
    out.parent.mkdir()
    inputs, config = {"in": "sha256:1"}, {"k": 1}
    started = run.begin("generate")
    out.write_text("partial")
    assert not run.is_done("generate", inputs, config)  # artifact present, no manifest: unfinished
    m = run.finish("generate", started, inputs, config, {"x": out}, {"n": 1})
    assert m["outputs"]["x"] == hash_path(out)
    assert run.is_done("generate", inputs, config)
    assert not run.is_done("generate", inputs, {"k": 2}) and not run.is_done("generate", {"in": "sha256:2"}, config)
    run.begin("generate")  # a new attempt first removes the old manifest
    assert not run.is_done("generate", inputs, config)


def test_hash_path_covers_directory_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    h1 = hash_path(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    assert hash_path(tmp_path / "d") != h1


def test_timings(tmp_path):
    run = RunDir(tmp_path)
    s = run.begin("train")
    time.sleep(0.01)
    run.finish("train", s, {}, {}, {}, {})
    assert run.timings()["train"] >= 0
