"""``bench/train_compare.py`` end to end on the CPU at a tiny shape (the GPU run uses the ~100-180M presets): the
byte-level data split by file (and the same files given as a tar archive give the same token files), every model trained with the same recipe, the report's bits per byte per scale,
the ratio to the dense model and the ordering check; a second call leaves complete models alone; reports of one
model each join into one (``--merge``)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quality_comparison_runs_reports_and_resumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("json", "email"):  # real Python sources, copied: a few hundred KB
        for f in (Path(sysconfig.get_paths()["stdlib"]) / name).glob("*.py"):
            shutil.copy(f, src / f"{name}_{f.name}")
    args = [sys.executable, str(ROOT / "bench" / "train_compare.py"), "--data", str(tmp_path / "data"), "--runs",
            str(tmp_path / "runs"), "--sources", str(src), "--models", "compare-dense,compare-16-16-air",
            "--dim", "64", "--layers", "2", "--ffn", "128", "--seq-len", "32", "--micro-batch", "4", "--steps", "6",
            "--eval-batches", "2", "--device", "cpu", "--json", str(tmp_path / "res.json")]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, timeout=300)
    res = json.loads((tmp_path / "res.json").read_text())
    prepared = json.loads((tmp_path / "data" / "prepared.json").read_text())
    assert prepared["val"]["num_docs"] >= 1 and prepared["train"]["num_docs"] > prepared["val"]["num_docs"]
    dense, air = res["models"]["compare-dense"], res["models"]["compare-16-16-air"]
    assert dense["complete"] and air["complete"]
    assert [s["scale"] for s in dense["scales"]] == [1] and [s["scale"] for s in air["scales"]] == [1, 2]
    for r in (dense, air):
        for s in r["scales"]:
            assert math.isfinite(s["bits_per_byte"]) and 0 < s["bits_per_byte"] < 9
            assert abs(s["perplexity_per_byte"] - 2 ** s["bits_per_byte"]) < 1e-6 * s["perplexity_per_byte"]
        assert r["train_tokens"] == 6 * 4 * 32 and r["train_tokens_per_s"] > 0
    want = air["scales"][-1]["perplexity_per_byte"] / dense["scales"][-1]["perplexity_per_byte"]
    assert abs(air["full_ppl_over_dense"] - want) < 1e-9
    assert air["scales_ordered"] == (air["scales"][0]["bits_per_byte"] > air["scales"][1]["bits_per_byte"])
    assert air["scales"][1]["params"] > air["scales"][0]["params"]
    assert (tmp_path / "res.png").exists()
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, timeout=300)  # complete: nothing retrained
    assert len((tmp_path / "runs" / "compare-dense" / "calls.jsonl").read_text().splitlines()) == 1
    # one model per report (as on a machine lent per call), joined: the same figures and ratio. The two reports only
    # read the data and their own model's run: they run at once
    reports = []
    for model in ("compare-dense", "compare-16-16-air"):
        one = [a if a != "compare-dense,compare-16-16-air" else model for a in args]
        one[one.index("--json") + 1] = str(tmp_path / f"{model}.json")
        reports.append(subprocess.Popen(one + ["--report-only"], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE))
    for p in reports:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (p.args, out[-2000:], err[-3000:])
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "train_compare.py"), "--merge",
                    f"{tmp_path / 'compare-dense.json'},{tmp_path / 'compare-16-16-air.json'}", "--json", str(merged)],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    got = json.loads(merged.read_text())["models"]
    assert abs(got["compare-16-16-air"]["full_ppl_over_dense"] - air["full_ppl_over_dense"]) < 1e-9


def test_sources_may_be_a_tar_archive(tmp_path):
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        shutil.copy(f, src / f.name)
    with tarfile.open(tmp_path / "lib.tar.xz", "w:xz") as t:
        for f in sorted(src.iterdir()):
            t.add(f, arcname=f"json/{f.name}")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_compare
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from_dir = train_compare.prepare(tmp_path / "a", [str(src)])
    from_tar = train_compare.prepare(tmp_path / "b", [str(tmp_path / "lib.tar.xz")])
    assert from_tar["train"]["num_docs"] + from_tar["val"]["num_docs"] == len(list(src.iterdir())) > 1
    assert (from_tar["train"]["num_tokens"] + from_tar["val"]["num_tokens"]
            == from_dir["train"]["num_tokens"] + from_dir["val"]["num_tokens"])
