"""reproduce.py --plan schedule (issue 16 section 1): every row at every budget, its epoch-counted
options scaled by report_figures.schedule.scale_to_budget; the table's paired deltas and its comparison
with pixel at equal wall-clock (report_figures/schedule.py)."""
import contextlib
import io
import json
import math
import os
import shlex

import pytest
import torch

import reproduce
from conftest import ROOT, run_stage_in_process
from config import SECTIONS, parse_config
from dataio.fake import write_fake_fashion_mnist
from report_figures.recipe import SCRIPTS, STUDY_RECIPE
from report_figures.plans import plan_finetune_rows
from report_figures.schedule import (budget_at_cost, collect_schedule, interp_log_budget, plotted_budgets,
                              scale_to_budget, schedule_table)
from report_figures.study import references

PLAN = reproduce.PLANS["schedule"]
REF = references("schedule")[0]  # pixel MAE
STAGE_OF = {v: k for k, v in SCRIPTS.items()}


def _dry_run(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(["--dry_run", *argv]) == 0
    return [shlex.split(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_plan_rows_and_default_budgets():
    assert PLAN[0] == REF and {"ema", "mae_k", "improved", "random", "scratch"} <= set(PLAN)
    cmds = _dry_run("--plan", "schedule", "--only", REF)
    assert sorted({c[c.index("--epochs") + 1] for c in cmds if c[1] == "main_pretrain.py"}, key=int) == \
        ["8", "32", "96"]
    # shortest budget first (every row and seed of it), duplicates dropped; scratch (no pretraining)
    # only at the longest budget
    cmds = _dry_run("--plan", "schedule", "--budgets", "32", "8", "32")
    pretrained = [n for n in PLAN if n != "scratch"]
    assert [c[c.index("--epochs") + 1] for c in cmds if c[1] == "main_pretrain.py"] == \
        ["8"] * len(pretrained) + ["32"] * len(pretrained)
    probes = [c[c.index("--output_dir") + 1] for c in cmds if c[1] == "main_linprobe.py"]
    assert [p for p in probes if "/scratch/" in p] == [os.path.join("output", "schedule", "scratch", "budget32",
                                                                     "seed0", "linprobe")]


def test_finetune_column_rows_at_the_longest_budget():
    """plan.yaml's finetune_rows get the study's short fine-tuning, once, at the longest budget; the
    same recipe for every row (the pretrained rows from their own checkpoint, scratch from random)."""
    ft_rows = plan_finetune_rows("schedule")
    assert set(ft_rows) <= set(PLAN) and {REF, "scratch"} <= set(ft_rows) and len(ft_rows) >= 3
    for plan in reproduce.PLANS:  # every plan's finetune_rows are rows of it
        assert set(plan_finetune_rows(plan)) <= set(reproduce.PLANS[plan])
    cmds = _dry_run("--plan", "schedule", "--seeds", "2", "--budgets", "8", "16")
    ft = [c for c in cmds if c[1] == "main_finetune.py"]
    out = [c[c.index("--output_dir") + 1].split(os.sep) for c in ft]
    assert sorted((o[-4], o[-3], o[-2]) for o in out) == sorted(
        (row, "budget16", f"seed{s}") for row in ft_rows for s in (0, 1))
    recipe = STUDY_RECIPE["finetune"]
    for c in ft:
        row = c[c.index("--output_dir") + 1].split(os.sep)[-4]
        cfg = parse_config(SECTIONS["finetune"], "finetune", c[2:])
        assert cfg.epochs == recipe["epochs"] < 100 and cfg.model == recipe["model"]
        assert (cfg.layer_decay, cfg.drop_path, cfg.smoothing, cfg.reprob) == (0.75, 0.1, 0.1, 0.25)  # report's
        if row == "scratch":
            assert "--from_scratch" in c and "--finetune" not in c
        else:
            seed = c[c.index("--seed") + 1]
            assert c[c.index("--finetune") + 1] == os.path.join("output", "schedule", row, "budget16",
                                                                f"seed{seed}", "pretrain", "checkpoint-last.pth")


def test_scale_to_budget():
    base = STUDY_RECIPE["pretrain"]
    assert base["epochs"] == 8 and base["warmup_epochs"] == 2
    ema = {"target": "ema", "wse": 2, "tau": 0.9, "ema_every": "epoch", "feature_ramp": 2}
    assert scale_to_budget(ema, 8, base) == {"epochs": 8, "warmup_epochs": 2, "wse": 2, "feature_ramp": 2,
                                             "tau": 0.9}
    at32 = scale_to_budget(ema, 32, base)
    assert at32 == {"epochs": 32, "warmup_epochs": 8, "wse": 8, "feature_ramp": 8, "tau": 0.9 ** 0.25}
    # the EMA keeps the same share of the past at the same fraction of the budget
    assert at32["tau"] ** 32 == pytest.approx(0.9 ** 8)
    assert scale_to_budget(ema, 96, base)["wse"] == 24
    assert scale_to_budget({"k": 2}, 32, base)["k"] == 8
    # rounded half up, at least 1; 0 stays 0; the row's own warm-up wins over the recipe's
    assert scale_to_budget({"k": 2, "wse": 0}, 2, base) == {"epochs": 2, "warmup_epochs": 1, "k": 1, "wse": 0}
    assert scale_to_budget({"k": 3}, 4, base)["k"] == 2 and scale_to_budget({"k": 3}, 12, base)["k"] == 5
    assert scale_to_budget({"warmup_epochs": 4}, 16, base)["warmup_epochs"] == 8
    assert scale_to_budget({"tau": 0.99, "tau_end": 0.999}, 16, base) == pytest.approx(
        {"epochs": 16, "warmup_epochs": 4, "tau": 0.99 ** 0.5, "tau_end": 0.999 ** 0.5})


def test_a_finetune_row_that_is_not_a_row_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "plan_finetune_rows", lambda plan: [REF, "pixle"])
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--plan", "schedule", "--dry_run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "finetune_rows pixle not in its rows" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_dry_run_commands_parse_at_every_budget(monkeypatch, tmp_path, teacher_file):
    cmds = _dry_run("--plan", "schedule", "--seeds", "2", "--budgets", "8", "32", "--data_path", str(tmp_path))
    pretrained = [r for r in PLAN if r != "scratch"]
    # seeds x (budgets x 2 stages x pretrained rows + scratch's probe + the fine-tunings at 32)
    assert len(cmds) == 2 * (2 * 2 * len(pretrained) + 1 + len(plan_finetune_rows("schedule")))
    monkeypatch.chdir(ROOT)
    seen = {}
    for c in cmds:
        stage = STAGE_OF[c[1]]
        if "--teacher" in c:  # a teacher row reads another row's run of the same seed and budget
            teacher, out = c[c.index("--teacher") + 1], c[c.index("--output_dir") + 1]
            row, budget, seed = out.split(os.sep)[-4:-1]
            source = {"teacher_pixel": "pixel/{}/{}/pretrain/encoder.safetensors",
                      "teacher_random": "random/{}/{}/pretrain/target_encoder.safetensors"}[row]
            assert teacher == os.path.join("output", "schedule", *source.format(budget, seed).split("/"))
            c = c[:c.index("--teacher") + 1] + [teacher_file] + c[c.index("--teacher") + 2:]  # a file that exists
        cfg = parse_config(SECTIONS[stage], stage, c[2:])
        row, budget, seed = cfg.output_dir.split(os.sep)[-4:-1]
        assert cfg.output_dir == os.path.join("output", "schedule", row, budget, seed, stage)
        assert seed == f"seed{cfg.seed}" and cfg.dataset == "fashion_mnist" and cfg.train_subset == 6000
        if stage == "pretrain":
            assert budget == f"budget{cfg.epochs}" and cfg.model == "mae_vit_smoke_patch4"
            seen[row, cfg.epochs] = cfg
        else:
            if stage == "linprobe":
                assert cfg.cached_features and cfg.knn and cfg.epochs == 300 and cfg.model == "vit_smoke_patch4"
            own = os.path.join(os.path.dirname(cfg.output_dir), "pretrain", "checkpoint-last.pth")
            assert cfg.finetune == ("" if row == "scratch" else own) and cfg.from_scratch == (row == "scratch")
    assert set(seen) == {(r, b) for r in pretrained for b in (8, 32)}
    for b, tau in ((8, 0.9), (32, 0.9 ** 0.25)):
        assert all(seen[r, b].warmup_epochs == b // 4 for r in pretrained)
        ema, improved, mae_k = seen["ema", b], seen["improved", b], seen["mae_k", b]
        assert (ema.target, ema.wse, ema.tau, ema.ema_every) == ("ema", b // 4, tau, "epoch")
        assert (improved.wse, improved.feature_ramp, improved.tau) == (b // 4, b // 4, tau)
        assert improved.pixel_weight == 1.0 and improved.target_layers == 3
        assert (mae_k.target, mae_k.k) == ("mae_k", b // 4)
        assert seen["random", b].target == "random" and seen[REF, b].target == REF
        staged, sepdec = seen["staged", b], seen["improved_sepdec", b]
        assert (staged.target, staged.k, staged.stage_reset) == ("staged", b // 2, True)  # two stages
        assert sepdec.feature_decoder == "separate" and seen["improved_mm2", b].num_masks == 2


def test_model_override_reaches_every_stage(monkeypatch):
    cmds = _dry_run("--plan", "schedule", "--only", REF, "--budgets", "8", "--model", "mae_vit_tiny_patch4")
    monkeypatch.chdir(ROOT)
    pre, probe, ft = (parse_config(SECTIONS[STAGE_OF[c[1]]], STAGE_OF[c[1]], c[2:]) for c in cmds)
    assert pre.model == "mae_vit_tiny_patch4" and probe.model == ft.model == "vit_tiny_patch4"
    assert pre.output_dir.startswith(os.path.join("output", "schedule-mae_vit_tiny_patch4", REF, "budget8"))


@pytest.mark.parametrize("argv,says", [
    (["--plan", "schedule", "--budgets", "1"], "--budgets must be >= 2"),
    (["--plan", "study", "--budgets", "8"], "--budgets applies to a plan with budgets"),
    (["--plan", "schedule", "--pretrain_epochs", "4"], "sets the epochs with --budgets"),
    (["--plan", "schedule", "--model", "vit_tiny_patch4"], "not a models_mae model"),
    (["--plan", "report", "--model", "mae_vit_tiny_patch4"], "--model applies to the study-recipe plans"),
])
def test_bad_schedule_flags_are_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv + ["--dry_run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_schedule_smoke_table(tmp_path, monkeypatch):
    """Two tiny budgets, two rows, one seed, on a generated Fashion-MNIST: runs land in
    ROW/budgetB/seed0, and the table, JSON and figure carry every row at every budget."""
    data = write_fake_fashion_mnist(str(tmp_path / "fmnist"), n_train=64, n_test=32)  # 2 steps an epoch
    runs = str(tmp_path / "runs")
    rows = [REF, "ema"]
    monkeypatch.setattr(reproduce, "run_stage", run_stage_in_process)
    argv = ["--plan", "schedule", "--scale", "smoke", "--budgets", "2", "3", "--data_path", data,
            "--train_subset", "0", "--output_root", runs, "--quiet", "--only", *rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.3M model at batch 32 gains nothing from a 2nd thread; a busy CPU loses much
    try:
        assert reproduce.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        for b in (2, 3):
            d = os.path.join(runs, row, f"budget{b}", "seed0")
            with open(os.path.join(d, "pretrain", "log.txt")) as f:
                log = [json.loads(line) for line in f if line.strip()]
            assert [r["epoch"] for r in log] == list(range(b)) and all(r["seconds"] > 0 for r in log)
            with open(os.path.join(d, "linprobe", "results.json")) as f:
                assert "knn_acc" in json.load(f)
            with open(os.path.join(d, "commands.json")) as f:
                assert f"--budgets {b}" in json.load(f)["reproduce"]
    # the short fine-tuning: pixel (a finetune_rows row) at the longest budget only, ema never
    for row, b in ((REF, 2), (REF, 3), ("ema", 2), ("ema", 3)):
        res = os.path.join(runs, row, f"budget{b}", "seed0", "finetune", "results.json")
        assert os.path.isfile(res) == ((row, b) == (REF, 3))
    with open(os.path.join(runs, REF, "budget3", "seed0", "finetune", "results.json")) as f:
        ft = json.load(f)
    assert ft["epochs"] == 1 and ft["kind"] == "finetune"
    # ema at budget 3: wse round(2 * 3/8) = 1, so epochs 1 and 2 regressed features
    with open(os.path.join(runs, "ema", "budget3", "seed0", "pretrain", "log.txt")) as f:
        assert [json.loads(line)["regress"] for line in f if line.strip()] == ["pixel", "feature", "feature"]
    with open(os.path.join(runs, "schedule_results.md")) as f:
        md = f.read()
    head = next(line for line in md.splitlines() if line.startswith("| row"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:7] == ["row", "budget (epochs)", "seeds", "probe best acc@1", "kNN acc",
                        f"Δ probe vs {REF}", f"Δ kNN vs {REF}"]
    assert f"wall-clock vs {REF}" in cols and f"FLOPs vs {REF}" in cols and f"{REF} epochs at equal FLOPs" in cols
    assert cols[-2:] == ["fine-tune acc@1 (last epoch)", f"Δ fine-tune vs {REF}"]
    assert "interpolation" in md
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
             if line.startswith("| ") and not line.startswith("| row")]
    assert [(t[0], t[1]) for t in table] == [(REF, "2"), (REF, "3"), ("ema", "2"), ("ema", "3")]
    for t in table:
        assert len(t) == len(cols) and t[2] == "1" and all(t[i] != "-" for i in (3, 4, 7))
        assert (t[5] == "-") == (t[0] == REF)  # the reference has no difference to itself
        assert (t[cols.index(f"wall-clock vs {REF}")] == "-") == (t[0] == REF)
        assert (t[cols.index(f"FLOPs vs {REF}")] == "-") == (t[0] == REF) and t[cols.index("pretrain TFLOP")] != "-"
        assert (t[-2] == "-") == ((t[0], t[1]) != (REF, "3"))
    assert float(next(t for t in table if (t[0], t[1]) == (REF, "3"))[-2]) == pytest.approx(ft["last_acc1"], abs=5e-3)
    with open(os.path.join(runs, "schedule_results.json")) as f:
        stats = json.load(f)
    assert stats["reference"] == REF and stats["budgets"] == [2, 3]
    ema3, pix3 = stats["rows"]["ema"]["3"], stats["rows"][REF]["3"]
    assert ema3[f"d_{REF}_knn_acc"][0] == pytest.approx(ema3["knn_acc"][0] - pix3["knn_acc"][0])
    assert ema3["cost_ratio"] == pytest.approx(ema3["pretrain_seconds"][0] / pix3["pretrain_seconds"][0])
    # counted FLOPs: pixel's are proportional to the epochs (same steps each); ema's feature epochs
    # (2 of 3) add the target pass, so it costs more than pixel at the same budget
    pix2 = stats["rows"][REF]["2"]
    assert pix3["pretrain_flops"][0] == pytest.approx(1.5 * pix2["pretrain_flops"][0])
    assert 1.0 < ema3["flops_ratio"] < 2.0 and ema3["eqf_budget"] == pytest.approx(3 * ema3["flops_ratio"])
    assert os.path.getsize(os.path.join(runs, "schedule.png")) > 1000
    buf = io.StringIO()  # a second call runs nothing
    monkeypatch.setattr(reproduce, "run_stage", lambda *a: pytest.fail("a stage ran"))
    with contextlib.redirect_stdout(buf):
        assert reproduce.main(argv) == 0
    assert buf.getvalue().count("skipped") == 9  # 2 rows x 2 budgets x (pretrain, probe) + 1 fine-tuning


def test_interpolation_helpers():
    cost = {8: 100.0, 32: 400.0, 96: 1200.0}
    assert budget_at_cost(cost, 200.0) == pytest.approx(16.0)  # log-log between 8 and 32
    assert budget_at_cost(cost, 400.0) == pytest.approx(32.0)
    assert budget_at_cost(cost, 2400.0) == pytest.approx(192.0)  # beyond: proportional
    assert budget_at_cost(cost, 50.0) == pytest.approx(4.0)
    assert budget_at_cost({}, 50.0) is None and budget_at_cost(cost, None) is None
    acc = {8: 70.0, 32: 80.0, 96: 83.0}
    assert interp_log_budget(acc, 16.0) == pytest.approx(75.0)  # log 16 halfway between log 8, log 32
    assert interp_log_budget(acc, 32.0) == 80.0
    assert interp_log_budget(acc, 32 * (1 + 1e-12)) == 80.0
    assert interp_log_budget(acc, 48.0) == pytest.approx(80 + 3 * math.log(1.5) / math.log(3))
    assert interp_log_budget(acc, 192.0) is None and interp_log_budget(acc, 4.0) is None  # not extrapolated


def _put(root, row, budget, seed, best, knn, seconds, ft=None):
    d = root / row / f"budget{budget}" / f"seed{seed}"
    (d / "linprobe").mkdir(parents=True)
    (d / "pretrain").mkdir()
    if ft is not None:  # a short fine-tuning: best != last, the table reads the last epoch's
        (d / "finetune").mkdir()
        (d / "finetune" / "results.json").write_text(json.dumps({"best_acc1": ft + 5, "last_acc1": ft}))
    (d / "linprobe" / "results.json").write_text(json.dumps({"best_acc1": best, "last_acc1": best, "knn_acc": knn}))
    per_epoch = seconds / budget  # the log's seconds sum to `seconds`; a resumed epoch's line repeats
    lines = [{"epoch": e, "seconds": per_epoch} for e in range(budget)] + [{"epoch": budget - 1, "seconds": per_epoch}]
    (d / "pretrain" / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_paired_deltas_and_equal_wall_clock(tmp_path):
    """Synthetic runs: pixel at 8 / 32 (/ 128, not asked for), ema at 8 and 32 costing 2x pixel."""
    for seed, (p8, p32) in enumerate(((70.0, 80.0), (72.0, 78.0))):
        _put(tmp_path, REF, 8, seed, p8, p8 - 10, 100.0)
        _put(tmp_path, REF, 32, seed, p32, p32 - 10, 400.0, ft=60.0 + seed)
        _put(tmp_path, "ema", 8, seed, p8 + 1 + seed, p8 - 12, 200.0)   # probe diffs +1, +2
        _put(tmp_path, "ema", 32, seed, p32 - 1, p32 - 10, 800.0, ft=63.0 + 2 * seed)  # ft diffs 3, 4
    st = collect_schedule(str(tmp_path), [REF, "ema"], [8, 32], REF)
    e8, e32 = st["ema"][8], st["ema"][32]
    m, sd, n = e8[f"d_{REF}_best_acc1"]
    assert (m, n) == (1.5, 2) and sd == pytest.approx(0.5 ** 0.5)  # paired: diffs 1 and 2
    assert e8[f"d_{REF}_knn_acc"][:2] == (-2.0, 0.0)
    assert e8["pretrain_seconds"][0] == pytest.approx(200.0)  # a repeated epoch counts once
    assert e8["cost_ratio"] == pytest.approx(2.0) and e8["eq_budget"] == pytest.approx(16.0)
    # pixel at 16 epochs, per seed halfway (in log-budget) between 8 and 32: 75 and 75
    assert e8["eq_best_acc1"][:2] == pytest.approx((75.0, 0.0))
    m, sd, n = e8["d_eq_best_acc1"]  # ema(8) - pixel(16): 71 - 75, 74 - 75
    assert (m, n) == (pytest.approx(-2.5), 2) and sd == pytest.approx(4.5 ** 0.5)
    assert e32["eq_budget"] == pytest.approx(64.0) and e32["eq_best_acc1"] is None  # beyond pixel's 32
    assert e32["d_eq_best_acc1"] is None and st[REF][8].get("cost_ratio") is None
    # a longer pixel run on disk (not asked for) covers ema at 32: pixel(64) between 32 and 128
    for seed, p128 in enumerate((84.0, 82.0)):
        _put(tmp_path, REF, 128, seed, p128, p128 - 10, 1600.0)
    st = collect_schedule(str(tmp_path), [REF, "ema"], [8, 32], REF)
    e32 = st["ema"][32]
    assert list(st[REF]) == [8, 32] and e32["eq_budget"] == pytest.approx(64.0)
    assert e32["eq_best_acc1"][0] == pytest.approx(81.0)  # halfway: (80 + 84) / 2, (78 + 82) / 2
    assert e32["d_eq_best_acc1"][0] == pytest.approx((79 - 82 + 77 - 80) / 2)
    lines = schedule_table(st, REF).splitlines()
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 19  # 16 + 2 fine-tuning columns
    assert lines[2].startswith(f"| {REF} | 8 | 2 | 71.00 ± 1.41 |")
    ema8 = lines[4].split("|")
    assert ema8[1].strip() == "ema" and "+1.50 ± 0.71" in ema8[6] and ema8[9].strip() == "2.00×"
    assert ema8[10].strip() == "-2.50 ± 2.12" and e8["eq_budget"] == pytest.approx(16.0)
    assert ema8[12].strip() == ema8[13].strip() == "-"  # no config.yaml here: no FLOPs counted
    assert ema8[17].strip() == ema8[18].strip() == "-"  # no fine-tuning at budget 8
    ema32 = lines[5].split("|")
    assert ema32[17].strip() == "64.00 ± 1.41" and ema32[18].strip() == "+3.50 ± 0.71"  # last epoch, paired
    assert e32["ft_acc1"][:2] == (64.0, pytest.approx(2 ** 0.5))
    # pixel alone at 128, asked for: a table line, but no point (nor x tick) in the figure
    st = collect_schedule(str(tmp_path), [REF, "ema"], [8, 32, 128], REF)
    assert list(st[REF]) == [8, 32, 128] and plotted_budgets(st, REF) == [8, 32]


def test_controls_table_pairs_each_row_with_pixel_and_the_random_teacher(tmp_path, capsys):
    """report_figures/controls.py (RESULTS section 7): Δ vs pixel and vs random, paired by seed at
    the same budget; "beats" needs both metrics beyond 2 paired std over 3 seeds."""
    from report_figures import controls
    for seed in range(3):
        _put(tmp_path, "pixel", 32, seed, 70.0 + seed, 60.0, 100.0)
        _put(tmp_path, "random", 32, seed, 71.0 + seed, 61.0 + seed, 100.0)
        _put(tmp_path, "mae_k", 32, seed, 73.0 + seed + 0.1 * seed, 64.0 + 1.1 * seed, 100.0)  # well ahead
        _put(tmp_path, "hog", 32, seed, 71.0 + seed + (0.5 if seed else -0.5), 61.0 + seed, 100.0)  # level
    stats = controls.collect_controls(str(tmp_path), ["mae_k", "hog"], [32])
    mk, hog = stats[32]["mae_k"], stats[32]["hog"]
    assert mk["d_pixel_best_acc1"][0] == pytest.approx(3.1) and mk["d_random_best_acc1"][0] == pytest.approx(2.1)
    assert controls.beats(mk, "pixel") and controls.beats(mk, "random")
    assert not controls.beats(hog, "random") and hog["d_random_knn_acc"][:2] == (0.0, 0.0)
    lines = controls.controls_table(stats, ["pixel", "random", "mae_k", "hog"]).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["pixel", "random", "mae_k", "hog"]
    assert [line.split("|")[-2].strip() for line in lines[2:]] == ["-", "-", "yes", "no"]
    assert "+2.10 ± 0.10" in lines[4]  # mae_k - random, probe: 2.0, 2.1, 2.2
    for argv, says in ((["--budgets", "64", "--rows", "mae_k"], "no finished probe"),  # nothing at 64
                       (["--budgets", "32", "--rows", "mae_kk"], "not rows of configs/schedule/plan.yaml")):
        with pytest.raises(SystemExit) as e:
            controls.main([str(tmp_path), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and len(err.splitlines()) == 1
    controls.main([str(tmp_path), "--budgets", "32", "--rows", "mae_k", "hog", "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "controls.png").stat().st_size > 0
    assert "| mae_k | 32 | 3 |" in (tmp_path / "fig" / "controls_results.md").read_text()
