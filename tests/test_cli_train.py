"""`dbllm-lab train` / `generate-data`: arguments reach the trainer, bad values fail before any model loads."""
import pytest

from dbllm_lab.cli import build_parser, main


def test_train_arguments():
    a = build_parser().parse_args(["train", "--loss", "kd", "--steps", "7", "--train-latent", "--gamma", "0.5"])
    assert (a.loss, a.steps, a.train_latent, a.gamma, a.init) == ("kd", 7, True, 0.5, "clip")
    assert a.func.__name__ == "cmd_train"
    g = build_parser().parse_args(["generate-data", "--n", "3", "--gen-len", "9"])
    assert (g.n, g.gen_len, g.func.__name__) == (3, 9, "cmd_generate_data")


@pytest.mark.parametrize("argv,match", [(["--gamma", "1.5"], "gamma"), (["--gamma", "-0.1"], "gamma"),
                                        (["--steps", "0"], "steps"), (["--loss", "mse"], "loss"),
                                        (["--lr", "0"], "lr")])
def test_train_bad_values_are_clear_errors(capsys, argv, match):
    assert main(["train"] + argv) == 2
    err = capsys.readouterr().err
    assert "dbllm-lab train: error:" in err and match in err


def test_existing_subcommands_kept():
    p = build_parser()
    for cmd in (["eval-ppl"], ["quantize"]):
        assert p.parse_args(cmd).command == cmd[0]
