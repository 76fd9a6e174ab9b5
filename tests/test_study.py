"""reproduce.py --plan study: smoke scale on a fake Fashion-MNIST produces its table (a row per
entry), every study row's full-scale command parses, and the report plan is untouched."""
import contextlib
import io
import json
import os
import shlex

import pytest

import reproduce
from report_figures.recipe import SCRIPTS
from conftest import ROOT, run_stage_in_process
from config import SECTIONS, parse_config
from dataio.fake import write_fake_fashion_mnist

ROWS = ["scratch", "pixel", "ema"]


def _dry_run(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--dry_run", *argv]) == 0
    return [shlex.split(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.mark.slow
def test_study_smoke_table(tmp_path, monkeypatch):
    data = write_fake_fashion_mnist(str(tmp_path / "fmnist"))
    runs, figs = str(tmp_path / "runs"), str(tmp_path / "figs")
    monkeypatch.setattr(reproduce, "run_stage", run_stage_in_process)
    assert reproduce.main(["--plan", "study", "--scale", "smoke", "--data_path", data, "--train_subset", "0",
                           "--output_root", runs, "--figures_dir", figs, "--quiet", "--only", *ROWS]) == 0
    for row in ROWS:
        assert not os.path.exists(os.path.join(runs, row, "seed0", "finetune"))  # no fine-tune stage
        with open(os.path.join(runs, row, "seed0", "linprobe", "results.json")) as f:
            res = json.load(f)
        assert res["epochs"] == 2 and "knn_acc" in res
    assert not os.path.exists(os.path.join(runs, "scratch", "seed0", "pretrain"))
    with open(os.path.join(figs, "study_results.md")) as f:
        md = f.read()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert [line.split("|")[1].strip() for line in table] == ROWS
    for line in table:  # probe best / last and kNN present for every row
        cells = [c.strip() for c in line.split("|")[3:6]]
        assert all(c != "-" for c in cells), line
        float(cells[2].split()[0])
    with open(os.path.join(figs, "study_results.json")) as f:
        stats = json.load(f)
    assert set(stats) == set(ROWS) and stats["pixel"]["knn_acc"][2] == 1
    assert stats["pixel"]["d_pixel_knn_acc"] is None  # the baseline has no difference to itself
    d = stats["ema"]["d_pixel_knn_acc"][0]
    assert d == pytest.approx(stats["ema"]["knn_acc"][0] - stats["pixel"]["knn_acc"][0])
    assert stats["ema"]["target_std"][0] > 0 and stats["scratch"]["target_std"] is None
    assert os.path.getsize(os.path.join(figs, "study.png")) > 1000
    # a second call skips every finished stage
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--plan", "study", "--scale", "smoke", "--data_path", data, "--train_subset", "0",
                               "--output_root", runs, "--figures_dir", figs, "--only", *ROWS]) == 0
    assert buf.getvalue().count("skipped") == 5


@pytest.mark.parametrize("scale", ["full", "smoke"])
def test_study_commands_parse(scale, monkeypatch, tmp_path):
    cmds = _dry_run("--plan", "study", "--scale", scale, "--seeds", "2", "--data_path", str(tmp_path))
    names = reproduce.PLANS["study"]
    assert len(cmds) == 2 * (2 * len(names) - 1)  # scratch has only the probe
    monkeypatch.chdir(ROOT)
    stage_of = {v: k for k, v in SCRIPTS.items()}
    for c in cmds:
        stage = stage_of[c[1]]
        assert stage in ("pretrain", "linprobe")
        cfg = parse_config(SECTIONS[stage], stage, c[2:])
        assert cfg.dataset == "fashion_mnist"
        if stage == "linprobe":
            assert cfg.cached_features and cfg.knn
    improved = next(c for c in cmds if "configs/study/improved.yaml" in c)
    cfg = parse_config(SECTIONS["pretrain"], "pretrain", improved[2:])
    assert cfg.target == "ema" and cfg.target_layers == 3 and cfg.pixel_weight == 1.0


def _preset_options(*path):
    import yaml
    with open(os.path.join(reproduce.ROOT, "configs", *path)) as f:
        return yaml.safe_load(f)["pretrain"]


# the options that choose what is regressed and how (epoch counts and tau are scaled per budget)
TARGET_SWITCHES = ("target", "ema_every", "target_layers", "target_norm", "target_prenorm", "pixel_weight",
                   "tau_end", "feature_decoder", "num_masks", "stage_reset")


def _assert_same_switches(row, preset):
    from config import PretrainConfig
    default = PretrainConfig()
    for key in TARGET_SWITCHES:
        assert row.get(key, getattr(default, key)) == preset.get(key, getattr(default, key)), key


def test_pretrain_improved_preset_is_the_best_schedule_row():
    """configs/pretrain_improved.yaml is the schedule study's best row at its longest budget
    (docs/RESULTS.md section 6: mae_k at 64 epochs), with its epoch-counted options scaled by the
    study's own rule to the preset's 200 epochs (K = a quarter of the budget)."""
    from report_figures.recipe import STUDY_RECIPE
    from report_figures.schedule import scale_to_budget
    best, preset = _preset_options("schedule", "mae_k.yaml"), _preset_options("pretrain_improved.yaml")
    _assert_same_switches(best, preset)
    scaled = scale_to_budget(best, preset["epochs"], STUDY_RECIPE["pretrain"])
    assert preset["k"] == scaled["k"] == 50


def test_pretrain_ema_improved_preset_is_the_improved_row_with_a_separate_decoder():
    """configs/pretrain_ema_improved.yaml (the preset before the 64-epoch runs) turns on exactly
    the target options of the schedule's improved_sepdec row, which is the 8-epoch study's improved
    row plus a separate feature decoder."""
    from config import PretrainConfig
    row, study = _preset_options("schedule", "improved_sepdec.yaml"), _preset_options("study", "improved.yaml")
    preset = _preset_options("pretrain_ema_improved.yaml")
    _assert_same_switches(row, preset)
    assert {k: v for k, v in row.items() if k != "feature_decoder"} == study
    assert preset["feature_decoder"] != PretrainConfig().feature_decoder


def test_study_default_data_path():
    cmds = _dry_run("--plan", "study", "--only", "pixel")
    assert all(c[c.index("--data_path") + 1] == reproduce.STUDY_DATA for c in cmds)
    assert all("output/study/" in c[c.index("--output_dir") + 1] for c in cmds)


def test_study_stats_are_paired_over_seeds(tmp_path):
    """Δ vs pixel is the mean +- std of per-seed differences, not a difference of means."""
    from report_figures.study import collect_study, study_table

    def put(row, seed, best, knn, tstd=None):
        d = tmp_path / row / f"seed{seed}"
        (d / "linprobe").mkdir(parents=True)
        (d / "linprobe" / "results.json").write_text(json.dumps({"best_acc1": best, "last_acc1": best,
                                                                 "knn_acc": knn}))
        if tstd is not None:
            (d / "pretrain").mkdir()
            (d / "pretrain" / "log.txt").write_text(json.dumps({"epoch": 0, "target_std": 9.0}) + "\n"
                                                    + json.dumps({"epoch": 1, "target_std": tstd}) + "\n")

    put("pixel", 0, 50.0, 60.0)
    put("pixel", 1, 60.0, 70.0)
    put("ema", 0, 52.0, 61.0, tstd=0.5)
    put("ema", 1, 63.0, 69.0, tstd=0.7)
    st = collect_study(str(tmp_path), ["pixel", "ema", "missing"])
    m, sd, n = st["ema"]["d_pixel_best_acc1"]
    assert (m, n) == (2.5, 2) and sd == pytest.approx(0.5 ** 0.5)  # diffs 2 and 3
    m, sd, n = st["ema"]["d_pixel_knn_acc"]
    assert m == 0.0 and sd == pytest.approx(2 ** 0.5)  # diffs +1 and -1
    m, sd, n = st["pixel"]["d_ema_best_acc1"]
    assert (m, n) == (-2.5, 2)  # the same pairs, seen from the other side
    assert st["ema"]["d_ema_best_acc1"] is None and st["pixel"]["d_pixel_knn_acc"] is None
    assert st["ema"]["target_std"][0] == pytest.approx(0.6)  # the last epoch, not the first
    assert st["missing"]["best_acc1"] is None
    lines = study_table(st).splitlines()
    assert lines[3].startswith("| ema | 2 | 57.50 ± 7.78 |") and "+2.50 ± 0.71" in lines[3]
    assert lines[2].count("|") == lines[0].count("|") == lines[1].count("|") == 13  # 12 columns
    assert lines[4].startswith("| missing | 0 | - |")
