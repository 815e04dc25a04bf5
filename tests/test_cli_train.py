"""`dbllm-lab train` / `generate-data`: arguments reach the trainer, bad values fail before any model loads."""
import pytest

from dbllm_lab.cli import build_parser, main


def test_train_arguments():
    a = build_parser().parse_args(["train", "--loss", "kd", "--steps", "7", "--train-latent", "--gamma", "0.5"])
    assert (a.loss, a.steps, a.train_latent, a.gamma, a.init) == ("kd", 7, True, 0.5, "clip")
    assert a.func.__name__ == "cmd_train"
    g = build_parser().parse_args(["generate-data", "--n", "3", "--gen-len", "9"])
    assert (g.n, g.gen_len, g.func.__name__) == (3, 9, "cmd_generate_data")


def test_train_end_to_end_defaults_follow_the_stage():
    """--stage both: unset end-to-end options take train.AFTER_STAGE1 (an lr of 1e-2 undoes a good stage 1);
    --stage e2e: TrainConfig's; explicit values win in both."""
    from dbllm_lab.blockwise import BlockwiseConfig
    from dbllm_lab.cli import train_configs
    from dbllm_lab.train import AFTER_STAGE1, TrainConfig
    both, bw = train_configs(build_parser().parse_args(["train"]))
    assert (both.lr, both.lr_latent, both.train_latent) == (AFTER_STAGE1["lr"], AFTER_STAGE1["lr_latent"], True)
    assert (bw.batch_size, bw.lr_latent) == (BlockwiseConfig().batch_size, BlockwiseConfig().lr_latent)
    e2e, _ = train_configs(build_parser().parse_args(["train", "--stage", "e2e"]))
    tc = TrainConfig()
    assert (e2e.lr, e2e.lr_latent, e2e.train_latent) == (tc.lr, tc.lr_latent, False)
    mine, _ = train_configs(build_parser().parse_args(["train", "--lr", "3e-3", "--lr-latent", "2e-5"]))
    assert (mine.lr, mine.lr_latent) == (3e-3, 2e-5)
    extra, _ = train_configs(build_parser().parse_args(["train", "--train-norms", "--lr-norm", "5e-4",
                                                        "--precision", "bf16"]))
    assert (extra.train_norms, extra.lr_norm, extra.precision) == (True, 5e-4, "bf16")
    assert (both.train_norms, both.precision) == (False, "fp32")
    _, windows = train_configs(build_parser().parse_args(["train", "--bw-seqlen", "128", "--bw-window-offset", "64"]))
    assert (windows.seqlen, windows.window_offset, bw.window_offset) == (128, 64, 0)
    _, decay = train_configs(build_parser().parse_args(["train", "--bw-min-lr-ratio", "0.01"]))
    assert (decay.min_lr_ratio, bw.min_lr_ratio) == (0.01, 0.1)


@pytest.mark.parametrize("argv,match", [(["--gamma", "1.5"], "gamma"), (["--gamma", "-0.1"], "gamma"),
                                        (["--steps", "0"], "steps"), (["--loss", "mse"], "loss"),
                                        (["--lr", "0"], "lr"), (["--n", "0"], "--n 0"),
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
