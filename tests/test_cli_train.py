"""`dbllm-lab train` / `generate-data`: arguments reach the trainer, bad values fail before any model loads."""
import pytest

from dbllm_lab.cli import build_parser, main


def test_train_arguments():
    a = build_parser().parse_args(["train", "--loss", "kd", "--steps", "7", "--train-latent", "--gamma", "0.5"])
    assert (a.loss, a.steps, a.train_latent, a.gamma, a.recipe) == ("kd", 7, True, 0.5, "quick")
    assert a.func.__name__ == "cmd_train"
    g = build_parser().parse_args(["generate-data", "--n", "3", "--gen-len", "9"])
    assert (g.n, g.gen_len, g.func.__name__) == (3, 9, "cmd_generate_data")


def test_train_takes_the_recipe_and_flags_override_it():
    """--recipe sets every setting; an explicit flag wins; anything neither sets is the dataclass default."""
    from dbllm_lab.blockwise import BlockwiseConfig
    from dbllm_lab.cli import train_recipe_of
    from dbllm_lab.recipes import RECIPES
    from dbllm_lab.run_recipe import configs
    r = train_recipe_of(build_parser().parse_args(["train", "--recipe", "best"]))
    assert r == RECIPES["best"]
    bw, cfg = configs(r, seed=3)
    assert (bw.epochs, bw.window_offset, bw.min_lr_ratio, bw.stats_samples, bw.seed) == (1, 64, 0.01, 64, 3)
    assert (bw.batch_size, bw.lr_latent, bw.lr) == (BlockwiseConfig.batch_size, BlockwiseConfig.lr_latent,
                                                     BlockwiseConfig.lr)
    assert (r["text"]["samples"], r["text"]["tokens"], r["quant"], r["stage"]) == (512, 512, "fdb", "blockwise")
    mine = train_recipe_of(build_parser().parse_args(
        ["train", "--recipe", "best", "--bw-min-lr-ratio", "0.1", "--n", "64", "--quant", "uniform", "--lr", "3e-3",
         "--no-bw-train-latent", "--train-seqlen", "256"]))
    assert (mine["blockwise"]["min_lr_ratio"], mine["text"]["samples"], mine["quant"]) == (0.1, 64, "uniform")
    assert (mine["e2e"]["lr"], mine["blockwise"]["train_latent"], mine["e2e"]["seqlen"]) == (3e-3, False, 256)
    assert RECIPES["best"]["blockwise"]["min_lr_ratio"] == 0.01  # the recipe itself is not edited
    text16 = train_recipe_of(build_parser().parse_args(["train", "--recipe", "best", "--text-precision", "bf16"]))
    assert text16["text"] == {**RECIPES["best"]["text"], "precision": "bf16"} and "precision" not in r["text"]


def test_recipe_text_section_is_checked_before_any_model_loads(capsys):
    from dbllm_lab.recipes import recipe
    from dbllm_lab.run_recipe import configs, text_options
    r = recipe("best")
    assert "precision" not in text_options(r["text"], 0, None)  # teacher_text's own default applies
    r["text"]["precision"] = "fp16"
    with pytest.raises(ValueError, match=r"precision='fp16'.*\('fp32', 'bf16'\)"):
        configs(r)
    r["text"] = {**recipe("best")["text"], "temperature": 0.7}
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]; allowed"):
        configs(r)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--text-precision", "fp16"])
    assert "invalid choice: 'fp16' (choose from 'fp32', 'bf16')" in capsys.readouterr().err


def test_best_recipe_is_the_committed_best_row():
    """`best` with seed 0 is the committed row 'fdb blockwise n512 len512 1ep fused off64 min0.01': the same
    block-wise settings and the same text (sets of 128 samples of 512 tokens with generation seeds 0-3)."""
    import json

    from dbllm_lab.datafree import SEED_STRIDE
    from dbllm_lab.recipes import recipe
    from dbllm_lab.run_recipe import configs
    from dbllm_lab.paths import root
    with open(f"{root()}/bench/results/dbllm_table.json") as f:
        table = json.load(f)
    s = table["settings"]
    row = s["rows"]["fdb blockwise n512 len512 1ep fused off64 min0.01"]
    committed = {**s["blockwise_base"], **row["blockwise"]}
    bw, _ = configs(recipe("best"), seed=0)
    assert {k: getattr(bw, k) for k in committed} == committed
    assert (row["samples"], s["data_generation"]["set_size"], SEED_STRIDE * 0) == (512, 128, 0)
    assert recipe("best")["text"] == {"samples": 512, "tokens": 512, "set_size": 128}


def test_recipes_command_lists_every_recipe(capsys):
    from dbllm_lab.recipes import RECIPES
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, r in RECIPES.items():
        assert f"{name} " in out and r["purpose"] in out
    from dbllm_lab import views  # a measured recipe shows its mean over seeds, as the README's table does
    best = views.row(views.load("dbllm_recipes.json"), "best")
    assert (f"held out {best['ppl_heldout_mean']:.2f} ± {best['ppl_heldout_sd']:.2f} ({best['heldout_over_fp']:.2f}x "
            f"FP), dev {best['ppl_dev']:.2f}, seeds 0,1,2; {best['total_cpu_minutes_mean']:.1f} CPU-min") in out
    lines = out.splitlines()
    paper = next(i for i, x in enumerate(lines) if x.startswith("paper "))
    assert lines[paper + 1].strip() == "not measured yet"


@pytest.mark.parametrize("argv,match", [(["--gamma", "1.5"], "gamma"), (["--gamma", "-0.1"], "gamma"),
                                        (["--steps", "0"], "steps"), (["--loss", "mse"], "loss"),
                                        (["--lr", "0"], "lr"), (["--n", "0"], "--n 0"), (["--recipe", "best-uniform", "--save", "x"], "FDB students only"),
                                        (["--e2e-n", "-4"], "--e2e-n -4"), (["--precision", "fp8"], "precision"),
                                        (["--lr-norm", "0"], "lr_norm"),
                                        (["--bw-window-offset", "-3"], "window_offset=-3"),
                                        (["--bw-min-lr-ratio", "1.5"], "min_lr_ratio=1.5")])
def test_train_bad_values_are_clear_errors(capsys, argv, match):
    assert main(["train"] + argv) == 2
    err = capsys.readouterr().err
    assert "dbllm-lab train: error:" in err and match in err


def test_existing_subcommands_kept():
    p = build_parser()
    for cmd in (["eval-ppl"], ["quantize"]):
        assert p.parse_args(cmd).command == cmd[0]


def test_table_runner_shares_a_stage_1_only_between_recipes_with_the_same_one():
    """bench/dbllm_table.py --stage1-from: best+dad and best+kd start from best's stage 1 of the same seed (their
    rows are then paired with best's); a recipe with another stage 1 (text, quantizer, init, settings) is refused
    before any model loads, naming what differs."""
    import importlib.util
    import os

    from dbllm_lab.paths import root
    spec = importlib.util.spec_from_file_location("dbllm_table", os.path.join(root(), "bench", "dbllm_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name in ("best+dad", "best+kd", "best"):
        assert table.shared_stage1(name, "best", 2, "runs") == os.path.join("runs", "best-s2", "stage1")
    assert table.shared_stage1("best+dad", None, 2, "runs") is None
    for name, differs in (("best-uniform", "quant"), ("best-quarter", "text"), ("paper", "text")):
        with pytest.raises(ValueError, match=f"{name}.*{differs}"):
            table.shared_stage1(name, "best", 0, "runs")
    with pytest.raises(ValueError, match="not known"):
        table.shared_stage1("best+dad", "no-such-recipe", 0, "runs")
    rows = [{"machine": "AMD EPYC (family 25 model 17; avx2)"}, {"machine": "Intel(R) Xeon(R) Processor (family 6)"},
            {"machine": "AMD EPYC (family 25 model 17; avx2)"}, {}]  # the summary's machines column
    assert table.machines(rows) == "AMD EPYC x2, Intel Xeon Processor x1, unrecorded x1"


def test_device_runner_refuses_bad_input_before_loading_the_model():
    """bench/train_device.py: an unknown recipe, a recipe that does not share --stage1-from's stage 1, and (on a
    machine without CUDA) --device cuda fail at once with the bad value and what is allowed."""
    import importlib.util
    import os

    import torch

    from dbllm_lab.paths import root
    spec = importlib.util.spec_from_file_location("train_device", os.path.join(root(), "bench", "train_device.py"))
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    with pytest.raises(ValueError, match="recipe 'nope' is not known; recipes:"):
        runner.main(["--recipes", "nope", "--device", "cpu"])
    with pytest.raises(ValueError, match="does not share 'best'"):
        runner.main(["--recipes", "best-uniform", "--stage1-from", "best", "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            runner.main(["--recipes", "best"])


@pytest.mark.slow
def test_device_runner_end_to_end_on_the_cpu(tmp_path):
    """bench/train_device.py --device cpu with the quick recipe (a few minutes): an FP row and a trained row are
    written, with the training's wall time and a perplexity far above FP's (a toy) but finite."""
    import importlib.util
    import json
    import math
    import os

    from dbllm_lab.paths import root
    spec = importlib.util.spec_from_file_location("train_device", os.path.join(root(), "bench", "train_device.py"))
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    out = tmp_path / "train_cpu.json"
    runner.main(["--recipes", "quick", "--seeds", "0", "--device", "cpu", "--max-windows", "2",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp", "quick s0"}
    fp, q = rows["fp"]["ppl"], rows["quick s0"]["ppl"]
    assert math.isfinite(q) and q > 2 * fp, (fp, q)
    assert rows["quick s0"]["train_wall_seconds"] > 0 and rows["quick s0"]["gpu_peak_gib"] is None
    from dbllm_lab.datafree import DEFAULT_CACHE, teacher_text, text_digest
    from dbllm_lab.model import load_model
    from dbllm_lab.recipes import recipe
    from dbllm_lab.run_recipe import text_options
    teacher, tok = load_model(None)
    t = recipe("quick")["text"]  # the row names the text it trained on
    text = teacher_text(teacher, tok, t["samples"], t["tokens"], progress=False,
                        **text_options(t, 0, DEFAULT_CACHE))
    assert rows["quick s0"]["text_sha256"] == text_digest(text)


def test_run_specs_have_one_parser_and_clear_errors(capsys, tmp_path):
    """run_recipe.parse_run is the one RECIPE:SEED parser (bench/zeroshot.py --run, bench/dbllm_probes.py) and
    run_name the one row name; bad specs and missing run folders fail before any model loads, naming the spec."""
    import importlib.util
    import json

    from dbllm_lab import views
    from dbllm_lab.paths import root
    from dbllm_lab.run_recipe import parse_run, run_name
    assert parse_run("best:1") == ("best", 1) and parse_run("best+bf16-text:12") == ("best+bf16-text", 12)
    assert run_name(*parse_run("best+bf16-text:12")) == "best+bf16-text s12"
    (tmp_path / "quant_config.json").write_text(json.dumps({"recipe": {"name": "best", "seed": 2}}))
    assert views.trained_label(str(tmp_path)) == f"trained {run_name('best', 2)}" == "trained best s2"
    for bad in ("best", "best:", "best:-1", "best:x", ":1"):
        with pytest.raises(ValueError, match="expected RECIPE:SEED" if bad != ":1" else "recipe '' is not known"):
            parse_run(bad)
    with pytest.raises(ValueError, match="recipe 'nope' is not known"):
        parse_run("nope:1")
    spec = importlib.util.spec_from_file_location("dbllm_probes", f"{root()}/bench/dbllm_probes.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    with pytest.raises(SystemExit):
        probes.main(["--position-ppl", "best:x"])
    assert "'best:x': expected RECIPE:SEED" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probes.main(["--stream-errors", "best:987"])
    assert "build/runs/best-s987/stage1 does not exist" in capsys.readouterr().err


def test_finished_run_folders_are_checked_before_any_work(tmp_path):
    """run_recipe.run_folder / finished_student (bench/zeroshot.py --run): a recipe with an end-to-end stage, a
    missing folder and an incomplete stage 1 are errors naming what is wrong, never a training run."""
    from types import SimpleNamespace

    from dbllm_lab.run_recipe import finished_student, run_folder, run_path
    assert run_path("best", 1) == "build/runs/best-s1"  # the one spelling every runner uses (POSIX paths)
    with pytest.raises(ValueError, match="stage 'both'; only stage-1 recipes"):
        run_folder("best+dad", 1, str(tmp_path))
    with pytest.raises(ValueError, match="recipe 'nope' is not known"):
        run_folder("nope", 1, str(tmp_path))
    with pytest.raises(ValueError, match=r"best-uniform-s3/stage1 does not exist; train it first"):
        run_folder("best-uniform", 3, str(tmp_path))
    stage1 = tmp_path / "best-uniform-s3" / "stage1"
    stage1.mkdir(parents=True)
    for k in range(2):
        (stage1 / f"block_{k:03d}.pt").write_bytes(b"")
    assert run_folder("best-uniform", 3, str(tmp_path)) == str(tmp_path / "best-uniform-s3")
    teacher = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30))
    with pytest.raises(ValueError, match="holds 2 of 30 blocks: finish the run first"):
        finished_student(teacher, None, "best-uniform", 3, str(tmp_path))
