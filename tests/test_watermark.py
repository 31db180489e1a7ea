import statistics
import subprocess

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.teachers import Request, load_backend
from stillhouse.watermark import keygen, load_config, z_scores
from tests.conftest import STILLHOUSE


def _z(model, texts, key):
    z = [x for x in z_scores(model, texts, key) if x == x]  # NaN: a text too short to score
    assert len(z) >= 4, z
    return statistics.mean(z)


def _texts(model, opts, n=8):
    b = load_backend(f"hf:{model}", opts)
    reqs = [Request(messages=({"role": "user", "content": f"Tell me about {i}."},), max_tokens=60, temperature=1.0,
                    seed=i) for i in range(n)]
    return [c.text for _, c in sorted(b.generate(reqs))]


def test_watermarked_output_scores_high_and_plain_output_does_not(tiny_models, tmp_path):
    key = tmp_path / "wm.json"
    keygen(key, bias=4.0)
    model = str(tiny_models["teacher"])
    marked = _z(model, _texts(model, {"watermark": str(key)}), key)
    plain = _z(model, _texts(model, {}), key)
    assert marked > 4 and plain < 2, (marked, plain)
    other = tmp_path / "other.json"
    keygen(other, bias=4.0)
    assert _z(model, _texts(model, {"watermark": str(key)}), other) < 2  # the key matters


def test_keygen_refuses_to_overwrite_and_bad_files_are_clear(tmp_path):
    key = tmp_path / "k.json"
    keygen(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600" and load_config(key).greenlist_ratio == 0.25
    with pytest.raises(StillhouseError, match="never overwritten"):
        keygen(key)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(StillhouseError, match="not a watermark key file"):
        load_config(tmp_path / "bad.json")
    out = subprocess.run([*STILLHOUSE, "watermark", "keygen", str(key)], capture_output=True, text=True)
    assert out.returncode == 2 and "never overwritten" in out.stderr


def test_too_short_text_scores_nan(tiny_models, tmp_path):
    key = tmp_path / "k.json"
    keygen(key)
    z = z_scores(str(tiny_models["teacher"]), ["a", "", "abcdefghij"], key)
    assert z[0] != z[0] and z[1] != z[1] and z[2] == z[2]
