"""report_figures/compare.py: two output roots of the same study rows, paired over the seeds both have,
with the config keys that differ between them."""
import json

import pytest

from report_figures.compare import compare_roots, compare_table, config_differences, main


def _put(root, row, seed, best, knn, seconds=None, precision="fp32", loss=0.5):
    d = root / row / f"seed{seed}"
    (d / "linprobe").mkdir(parents=True)
    (d / "linprobe" / "results.json").write_text(json.dumps({"best_acc1": best, "last_acc1": best, "knn_acc": knn}))
    (d / "pretrain").mkdir()
    (d / "pretrain" / "config.yaml").write_text(f"precision: {precision}\noutput_dir: {d}\nseed: {seed}\n")
    if seconds is not None:
        (d / "pretrain" / "log.txt").write_text(json.dumps({"epoch": 0, "seconds": seconds, "loss": loss}) + "\n")


@pytest.fixture
def roots(tmp_path):
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    _put(a, "pixel", 0, 50.0, 60.0, seconds=10.0)
    _put(a, "pixel", 1, 60.0, 70.0, seconds=12.0)
    _put(a, "pixel", 2, 99.0, 99.0)  # no partner in B: left out of every column
    _put(b, "pixel", 0, 51.0, 58.0, seconds=30.0, precision="bf16", loss=0.5012)
    _put(b, "pixel", 1, 63.0, 70.0, seconds=40.0, precision="bf16", loss=0.5004)
    return a, b


def test_differences_are_paired_over_the_common_seeds(roots):
    a, b = roots
    st = compare_roots(str(a), str(b), ["pixel", "ema"])
    px = st["pixel"]
    assert px["seeds"] == [0, 1]
    assert px["a"]["best_acc1"][:1] == (55.0,) and px["b"]["best_acc1"][:1] == (57.0,)  # seed 2 not in A's mean
    m, sd, n = px["d"]["best_acc1"]
    assert (m, n) == (2.0, 2) and sd == pytest.approx(2 ** 0.5)  # diffs +1 and +3
    m, sd, n = px["d"]["knn_acc"]
    assert (m, n) == (-1.0, 2) and sd == pytest.approx(2 ** 0.5)  # diffs -2 and 0
    assert px["d"]["pretrain_seconds"][0] == pytest.approx(24.0)
    assert px["d"]["pretrain_loss"][0] == pytest.approx(0.0008)
    assert st["ema"]["seeds"] == [] and st["ema"]["d"]["best_acc1"] is None


def test_table_names_the_labels_and_the_changed_config(roots):
    a, b = roots
    diffs = config_differences(str(a), str(b), {"pixel": [0, 1]})
    assert diffs == {"precision": ("fp32", "bf16")}  # output_dir differs too, but is a path
    lines = compare_table(compare_roots(str(a), str(b), ["pixel"]), ("fp32", "bf16"), diffs).splitlines()
    assert "Δ probe best acc@1 (bf16 − fp32)" in lines[0]
    assert lines[2].startswith("| pixel | 2 | 55.00 ± 7.07 | 57.00 ± 8.49 | +2.00 ± 1.41 |")
    assert "| 0.5000 ± 0.0000 | 0.5008 ± 0.0006 | +0.0008 ± 0.0006 |" in lines[2]  # losses: 4 decimals
    assert lines[0].count("|") == lines[2].count("|") == 15  # 14 columns
    assert lines[-1] == "Pretraining configs differ in: precision: fp32 → bf16."


def test_cli_prints_the_table_and_refuses_roots_without_pairs(roots, tmp_path, capsys):
    a, b = roots
    main([str(a), str(b), "--rows", "pixel", "--labels", "fp32", "bf16"])
    assert "| pixel | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(a), str(b), "--rows", "ema"])
    assert e.value.code == 2 and "no seed of ema has a finished probe in both roots" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(a), str(tmp_path / "nope"), "--rows", "pixel"])
    assert e.value.code == 2 and "no run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a flag missing: one line, no usage block
        main([str(a), str(b)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: the following arguments")
