import json

import pytest

from dbllm_lab.cli import main


def test_eval_ppl_writes_json(tmp_path, data_dir):
    out = tmp_path / "r.json"
    assert main(["eval-ppl", "--data-dir", data_dir, "--seqlen", "128", "--max-windows", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["windows"] == 2 and r["seqlen"] == 128 and 5 < r["ppl"] < 200


@pytest.mark.parametrize("argv, needle", [
    (["eval-ppl", "--seqlen", "1"], "seqlen=1"),
    (["eval-ppl", "--dataset", "ptb"], "dataset='ptb'"),
    (["quantize", "--method", "int3"], "invalid choice: 'int3'"),
    (["quantize", "--method", "fdb", "--group-size", "100"], "does not divide"),
    (["quantize", "--method", "gptq"], "--calib-data"),
])
def test_bad_input_exits_2_with_a_message(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own checks (e.g. --method choices) exit 2 with a usage line
        rc = e.code
    assert rc == 2
    assert needle in capsys.readouterr().err
