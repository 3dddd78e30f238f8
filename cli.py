"""What the command lines (wadi.py, evaluate.py) share: option types that check their range when the
command line is parsed, a parser whose errors are one line, and defaults shown in every --help.

A value the user can fix is one line on stderr, `PROG: error: argument --batch-size: must be an integer
>= 1, got '0'`, and exit code 2, never a traceback (README, "Set up and test").
"""
import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block: `--help` has it) and each option's default in its
    help text, subcommands included."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" to options that have a default and whose
    help does not mention one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def integer(low=None, high=None):
    """An argparse type: an int within [low, high] (either bound may be None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        return _in_range(value, text, "an integer", low, high)
    parse.__name__ = "integer"
    return parse


def number(low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite float within the bounds, each bound included unless `*_open` is set."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return _in_range(value, text, "a number", low, high, low_open, high_open)
    parse.__name__ = "number"
    return parse


def _in_range(value, text, kind, low, high, low_open=False, high_open=False):
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return value
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"{'<' if high_open else '<='} {high:g}"
    raise argparse.ArgumentTypeError(f"must be {kind} {bounds}, got {text!r}")


POSITIVE = integer(1)           # counts: batch sizes, steps, ranks, sample numbers
NON_NEGATIVE = integer(0)       # seeds, optional counts where 0 means "off"
RATE = number(0, low_open=True)  # learning rates
SCALE = number(0)                # guidance scales
