"""The shipped demo path end to end on CPU: prepare-data -> train (multi-chain loss) -> eval per scale.

Shows the paper's behaviour on a short run: every scale learns, and the full scale (more chains)
ends with a lower loss than scale 1.
"""

from __future__ import annotations

import json
import math

from colm.cli import main as colm_main


def test_demo_train_and_eval_per_scale(tmp_path, capsys):
    data = tmp_path / "data"
    assert colm_main(["prepare-data", "pydoc:topics", "--out", str(data), "--max-docs", "60", "--val-fraction", "0.1"]) == 0
    run = tmp_path / "run"
    rc = colm_main(["train", "--config", "configs/train/demo.yaml", f"data.train={data}/train.bin",
                    f"data.val={data}/val.bin", "optim.steps=120", "optim.warmup_steps=10", "data.seq_len=64",
                    f"run.out_dir={run}", "run.eval_every=60", "run.eval_batches=4", "run.progress=false"])
    assert rc == 0
    assert (run / "loss.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 120 and sum(r["kind"] == "val" for r in rows) == 2
    first, last = train_rows[0]["scale_loss"], train_rows[-1]["scale_loss"]
    assert all(f > 5.0 for f in first)  # ~ln(259) = 5.56 at random init
    assert last[0] < first[0] - 1.5 and last[1] < first[1] - 1.5  # both scales learned
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert colm_main(["eval", "--model", str(run / "model"), "--data", f"{data}/val.bin", "--seq-len", "64",
                      "--max-batches", "8", "--json", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "ppl" in table and "[2, 2]" in table
    result = json.loads(out.read_text())
    s1, s2 = result["scales"]
    assert s1["loss"] > s2["loss"]  # the paper's ordering: more chains, lower loss
    assert s1["params"] < s2["params"]
    assert math.isclose(s2["ppl"], math.exp(s2["loss"]), rel_tol=1e-9)
    assert result["tokens"] == 8 * 8 * 64
