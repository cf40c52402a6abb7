"""The command line: ``avar-kernels`` (op demo, the default), ``avar-kernels vas`` (embedded tiny model)."""
import re
import warnings

import pytest

from avar_kernels.cli import main

SMALL_OP = ["--image", "64", "--system", "8", "--user", "16", "--response", "16", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--repeats", "1"]


def test_op_small(capsys):
    import avar_kernels.cli as cli

    args = cli.build_parser().parse_args(["op"])
    assert args.run is cli.op.run and (args.image, args.heads, args.dtype) == (1024, 16, "float32")
    assert main(["op", *SMALL_OP]) == 0
    out = capsys.readouterr().out
    assert "S=104" in out and "max |error| vs float64 reference" in out and "forward time" in out
    errs = re.search(r"out ([\d.e+-]+), mass ([\d.e+-]+), lse ([\d.e+-]+)", out)
    assert errs and all(float(e) < 1e-4 for e in errs.groups())


def test_main_without_arguments_is_op(capsys, monkeypatch):
    import avar_kernels.cli as cli

    calls = []
    monkeypatch.setattr(cli.op, "run", lambda args: calls.append(args) or 0)
    assert main([]) == 0
    assert len(calls) == 1 and calls[0].command == "op" and calls[0].image == 1024
    # the pre-subcommand form: op options without 'op'
    assert main(SMALL_OP) == 0 and calls[1].image == 64 and calls[1].repeats == 1


def test_vas_embedded_default(capsys):
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["vas", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out
    vas = re.search(r"VAS = ([\d.]+) ", out)
    assert vas and 0 < float(vas.group(1)) < 1e3
    assert re.search(r"^\s+1\s+[\d.]+\s+[\d.]+$", out, re.M)            # per-layer rows (2 layers)
    err = re.search(r"eager check: .* = ([\d.e+-]+)", out)
    assert err and float(err.group(1)) < 1e-5
    assert "plain:" in out and "VAF alpha=0.15" in out


@pytest.mark.parametrize("argv, message", [
    (["op", "--heads", "x"], "argument --heads: not an integer"),
    (["op", "--heads", "0"], "argument --heads: must be >= 1"),
    (["op", "--heads", "4", "--kv-heads", "3"], "argument --kv-heads: must divide --heads"),
    (["op", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["vas", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 0"),
    (["vas", "--vaf", "nan"], "argument --vaf: must be finite"),
    (["vas", "--image", "/nonexistent/cat.jpg"], "argument --image: no such file"),
    (["vas", "--bogus"], "unrecognized arguments: --bogus"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_vas_bad_model_is_an_argument_error(capsys, monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        main(["vas", "--model", str(tmp_path / "no-such-model"), "--device", "cpu"])
    assert e.value.code == 2
    assert "argument --model: cannot load" in capsys.readouterr().err


def test_help(capsys):
    for argv in (["--help"], ["vas", "--help"], ["op", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{op,vas,eval,train,synth,run}" in out and "--max-new-tokens N" in out and "--kv-heads" in out


def test_errors_are_one_line(capsys):
    # a backend that cannot run here: one line on stderr naming the argument, exit code 1, no traceback
    assert main(["op", *SMALL_OP, "--backend", "triton", "--device", "cpu"]) in (0, 1)
    err = capsys.readouterr().err
    if err:
        assert err.count("\n") == 1 and "backend='triton'" in err and "Traceback" not in err
