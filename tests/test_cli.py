"""cli.py and the command lines built on it: every numeric option is checked when it is parsed (one line,
exit 2, no traceback), and every option of every command has help text with its default."""
import argparse
import os

import pytest

import cli
import evaluate
import wadi


def parse_error(main, argv, capsys):
    """(exit code, stderr lines) of a command line that argparse refuses."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


BAD = [  # (command line, the option named, what the message says)
    (["train", "--backbone", "toy", "--batch-size", "0"], "--batch-size", "must be an integer >= 1, got '0'"),
    (["train", "--grad-accum", "-1"], "--grad-accum", ">= 1"),
    (["train", "--max-steps", "-5"], "--max-steps", ">= 0"),
    (["train", "--epochs", "0"], "--epochs", "must be a number > 0, got '0'"),
    (["train", "--lr=-1e-4"], "--lr", "> 0"),
    (["train", "--lr-fake", "nan"], "--lr-fake", "finite"),
    (["train", "--rank", "0"], "--rank", ">= 1"),
    (["train", "--rank-fake", "1.5"], "--rank-fake", "must be an integer, got '1.5'"),
    (["train", "--guidance", "-1"], "--guidance", ">= 0"),
    (["train", "--ema", "1"], "--ema", "in [0, 1)"),
    (["train", "--resolution", "0"], "--resolution", ">= 1"),
    (["train", "--checkpoint-every", "0"], "--checkpoint-every", ">= 1"),
    (["train", "--validate-every", "0"], "--validate-every", ">= 1"),
    (["train", "--eval-samples", "1"], "--eval-samples", ">= 2"),
    (["train", "--seed", "-1"], "--seed", ">= 0"),
    (["sample", "--prompt", "a", "--out", "x.png", "--steps", "0"], "--steps", ">= 1"),
    (["sample", "--prompt", "a", "--out", "x.png", "--steps", "-1"], "--steps", ">= 1"),
    (["sample", "--prompt", "a", "--out", "x.png", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["sample", "--prompt", "a", "--out", "x.png", "--num-per-prompt", "0"], "--num-per-prompt", ">= 1"),
    (["sample", "--prompt", "a", "--out", "x.png", "--guidance", "inf"], "--guidance", "finite"),
    (["sample", "--prompt", "a", "--out", "x.png", "--seed", "x"], "--seed", "must be an integer, got 'x'"),
    (["pretrain", "--steps", "0"], "--steps", ">= 1"),
    (["pretrain", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["pretrain", "--lr", "0"], "--lr", "> 0"),
]


@pytest.mark.parametrize("argv, option, message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_wadi_refuses_out_of_range_values_in_one_line(argv, option, message, capsys):
    code, lines = parse_error(wadi.main, argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"wadi.py {argv[0]}: error: argument {option}") and message in lines[0], lines[0]


@pytest.mark.parametrize("extra, option", [(["--num", "0"], "--num"), (["--batch-size", "0"], "--batch-size"),
                                           (["--steps", "0"], "--steps"), (["--guidance", "-2"], "--guidance"),
                                           (["--resolution", "-8"], "--resolution")])
def test_evaluate_refuses_out_of_range_values_in_one_line(extra, option, capsys):
    code, lines = parse_error(evaluate.main, ["--coco", "2014", *extra], capsys)
    assert code == 2 and len(lines) == 1 and f"argument {option}" in lines[0], lines


def all_parsers():
    parser = wadi.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {f"wadi.py {name}": p for name, p in subparsers.choices.items()} | {"evaluate.py": evaluate.build_parser()}


@pytest.mark.parametrize("name", sorted(all_parsers()))
def test_every_option_has_help_with_its_default(name):
    parser = all_parsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        if action.default not in (None, False):
            assert "default" in cli.HelpFormatter(name)._get_help_string(action), action.option_strings
    assert "%(default)" not in text


def test_backbone_dependent_train_defaults_say_so():
    helps = {a.option_strings[0]: a.help for a in all_parsers()["wadi.py train"]._actions if a.option_strings}
    for option in ("--rank", "--rank-fake", "--lr", "--lr-fake", "--batch-size", "--max-steps", "--guidance",
                   "--ema", "--checkpoint-every", "--validate-every"):
        assert "backbone default" in helps[option], option


def test_option_types():
    assert cli.integer(1)("3") == 3 and cli.number(0, 1, high_open=True)("0.5") == 0.5
    for parse, text in [(cli.integer(1), "0"), (cli.integer(0, 10), "11"), (cli.number(0, low_open=True), "0"),
                        (cli.number(0, 1, high_open=True), "1"), (cli.number(), "-inf"), (cli.integer(), "2.0")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_threads(monkeypatch):
    """--threads N sets torch's threads; auto takes OMP_NUM_THREADS when set, else the cores other processes leave
    idle (at least one), shared by torchrun's local processes."""
    import torch
    before = torch.get_num_threads()
    try:
        assert cli.set_threads(1) == (1, "threads: 1 (--threads)") and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cli.set_threads("auto")[0] == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
        for busy, expected in ((0, 8), (1, 7), (3, 5), (11, 1)):
            monkeypatch.setattr(cli, "busy_cores", lambda: busy)
            count, line = cli.set_threads("auto")
            assert count == expected and torch.get_num_threads() == expected
            assert line == f"threads: {expected} (auto: 8 cores, {busy} kept busy by other processes; --threads N " \
                           f"sets it)"
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(cli, "busy_cores", lambda: 1)
        assert cli.set_threads("auto")[0] == 3  # (8 - 1) // 2
    finally:
        torch.set_num_threads(before)
    assert cli.threads("auto") == "auto" and cli.threads("2") == 2
    with pytest.raises(argparse.ArgumentTypeError):
        cli.threads("0")


def test_busy_cores_is_the_smaller_of_the_load_average_and_the_running_count(monkeypatch, tmp_path):
    real_open = open

    def proc(running):
        (tmp_path / "loadavg").write_text(f"1.90 1.50 1.20 {running}/300 12345\n")
        monkeypatch.setattr(cli, "open", lambda path, *a, **k: real_open(tmp_path / "loadavg") if path ==
                            "/proc/loadavg" else real_open(path, *a, **k), raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.9, 1.5, 1.2))
    proc(1)  # only this process runs: a job that just ended still weighs on the average
    assert cli.busy_cores() == 0
    proc(3)
    assert cli.busy_cores() == 2
    proc(9)  # a burst of short processes: the average says 2
    assert cli.busy_cores() == 2


def test_a_run_directory_is_resumed_replaced_or_refused(tmp_path):
    out = tmp_path / "run"
    assert cli.check_run_out(str(out), None, False) == []  # nothing there yet
    out.mkdir()
    (out / "console.log").write_text("not ours\n")
    assert cli.check_run_out(str(out), None, False) == []  # a folder with other files is not a run
    for name in ("run.json", "train.log", "checkpoint-0000002.safetensors"):
        (out / name).write_text("{}")
    (out / "samples").mkdir()
    with pytest.raises(cli.UsageError, match=r"already holds a run \(run.json, train.log, samples, \.\.\.\): continue "
                                             r"it with --resume latest, start over with --overwrite"):
        cli.check_run_out(str(out), None, False)
    assert cli.check_run_out(str(out), "latest", False) == []
    with pytest.raises(cli.UsageError, match="give one"):
        cli.check_run_out(str(out), "latest", True)
    found = cli.check_run_out(str(out), None, True)
    assert sorted(found) == ["checkpoint-0000002.safetensors", "run.json", "samples", "train.log"]
    cli.remove_run(str(out), found)
    assert os.listdir(out) == ["console.log"]


def test_environment(monkeypatch):
    import subprocess

    import torch
    env = cli.environment(torch.device("cpu"), 2)
    head = subprocess.run(["git", "-C", cli.os.path.dirname(cli.__file__), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert env["git_commit"].startswith(head) and len(head) == 40
    assert env["torch"] == torch.__version__ and env["threads"] == 2 and env["device"].startswith("cpu (")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(cli.subprocess, "run", no_git)
    assert cli.environment(torch.device("cpu"), 1)["git_commit"] == "not a git checkout"
