"""The command line: every subcommand has --help; generate streams; user errors exit with code 2."""

import pytest

import main
from tests.tiny import tiny_llama, tiny_tokenizer, word_tokenizer


def _unavailable_device() -> str:
    from engine.devices import _PROBES

    return next(name for name in ("mps", "directml", "cuda") if _PROBES[name]() is None)  # no machine has all three


UNAVAILABLE_DEVICE = _unavailable_device()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    for name, layers in (("target", 2), ("draft", 1)):
        tiny_llama(len(tok), layers=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    wt = word_tokenizer(8)
    tiny_llama(8, layers=1).save_pretrained(root / "other")
    wt.save_pretrained(root / "other")
    return root


@pytest.mark.parametrize("cmd", [[], ["generate"], ["serve"], ["bench"], ["doctor"]])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(cmd + ["--help"])
    assert exc.value.code == 0
    assert "--target" in capsys.readouterr().out


def test_generate_streams_text_and_stats(model_dirs, capsys):
    rc = main.main(["generate", "Once upon a time", "--target", str(model_dirs / "target"), "--draft",
                    str(model_dirs / "draft"), "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0
    assert "12 tokens" in out.err and "acceptance" in out.err
    assert len(out.out.strip()) > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--top-p", "2"], "top_p"),
        (["--target", "/no/such/folder"], "does not exist"),
        (["--draft", "OTHER"], "tokenizers are incompatible"),
        (["--device", UNAVAILABLE_DEVICE], "not available"),
    ],
)
def test_generate_user_errors_exit_2_with_a_message(model_dirs, capsys, args, message):
    args = [str(model_dirs / "other") if a == "OTHER" else a for a in args]
    base = ["generate", "Once", "--device", "cpu", "--target", str(model_dirs / "target")]
    rc = main.main(base + args)
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
