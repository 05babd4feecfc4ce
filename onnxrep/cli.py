"""Command line: ``python -m onnxrep IN [-o OUT] [options]`` (also the ``onnxrep`` script).

Exit status: 0 written (or nothing to write with --dry-run), 1 verification failed, 2 bad input,
options or paths (a write the OS refused included), 3 internal error, 130 / 143 interrupted by
SIGINT / SIGTERM. Errors are one line on stderr; nothing is written on any error, and every file
is either written completely or left as it was (docs/files.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
import traceback
from typing import Dict, List, Optional


import onnxruntime as ort

from . import __version__, modelio, runtime
from .core import optimized
from .errors import OnnxrepError, UsageError, VerificationError, first_line
from .report import failure_dict
from .rules import DEFAULT_RULES

EXIT_OK, EXIT_VERIFY, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error convention (argparse prints usage first by default)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"onnxrep: error: {message} (see --help)\n")


def _positive(kind, zero: bool = False):
    """An argparse type: a number above 0 (or at least 0), with a one-line message otherwise."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= 0 if zero else value > 0) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {'at least 0' if zero else 'above 0'}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    rules = "\n".join(f"  {r.name:28s} {r.summary}" for r in DEFAULT_RULES)
    p = _Parser(
        prog="onnxrep",
        description="Re-parameterize a training-structure ONNX model into its deploy structure, "
        "verified against the original with onnxruntime.",
        epilog=f"rules (default order):\n{rules}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="ONNX model to optimize (never modified unless --in-place)")
    p.add_argument("output_pos", nargs="?", metavar="OUTPUT", help="where to write the result (same as -o)")
    p.add_argument("-o", "--output", help="where to write the result (default: INPUT with .rep.onnx; '-': stdout)")
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
        help="concrete shape for an input with dynamic dims (repeatable; NAME:D0,D1,... as in onnxsim works too); "
        "a dynamic batch axis defaults to 1",
    )
    p.add_argument("--rtol", type=_positive(float),
                   help="verification tolerance per output channel, relative to that channel's largest value "
                   "(default by computation dtype: float32 1e-4, float16 1e-2, bfloat16 5e-2)")
    p.add_argument("--atol", type=_positive(float, zero=True),
                   help="absolute error floor replacing the default relative one (float32 1e-6, float16 1e-3 "
                   "of the tensor's largest value); rarely needed")
    p.add_argument("--verify-draws", type=_positive(int), default=5, metavar="N",
                   help="random input draws compared: normal, x1e3, zeros, positive, negative (default 5, one of each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs (default 0)")
    p.add_argument("--only", action="append", default=[], metavar="RULE", help="run only this rule (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="RULE", help="do not run this rule (repeatable)")
    p.add_argument("--enable", action="append", default=[], metavar="RULE",
                   help="also run this rule that is off by default (repeatable): merge_horizontal_convs")
    p.add_argument(
        "--allow-growth", action="store_true",
        help="also apply rewrites that raise MACs (misaligned branches, 1x1 -> depthwise compositions, "
        "concat branches padded with zero taps)",
    )
    p.add_argument("--no-verify", action="store_true", help="write the result WITHOUT checking it (not recommended)")
    p.add_argument("--no-rollback", action="store_true", help="fail instead of dropping a rewrite that fails verification")
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON ('-': stdout; the summary then goes to stderr)")
    p.add_argument("--in-place", action="store_true", help="allow OUTPUT to be the INPUT file itself")
    p.add_argument("--dry-run", action="store_true", help="optimize and verify, but write no model")
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    talk.add_argument("-v", "--verbose", action="store_true", help="list every rewrite and every declined match")
    p.add_argument("--version", action="version", version=f"onnxrep {__version__}")
    return p


def parse_shapes(items: List[str], label: str = "") -> Dict[str, List[int]]:
    prefix = f"{label}: " if label else ""
    shapes: Dict[str, List[int]] = {}
    for item in items:
        # NAME=dims, or NAME:dims as onnxsim, onnxslim and polygraphy spell it (the last ':'
        # separates, so tf2onnx names such as 'x:0' still work)
        name, sep, dims = item.rpartition("=") if "=" in item else item.rpartition(":")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or min(values) <= 0:
            raise UsageError(f"{prefix}--input-shape {item!r}: expected NAME=D0,D1,... (or NAME:D0,D1,...) "
                             "with positive integers")
        shapes[name] = values
    return shapes


def default_output(path: str) -> str:
    root = path[: -len(".onnx")] if path.endswith(".onnx") else path
    return root + ".rep.onnx"


#: ``-o -`` and ``--report -`` write to standard output.
STDOUT = "-"


def _is_stdout(path: str) -> bool:
    """``-``, or a path that leads to the file standard output is open on (/dev/stdout, ...)."""
    if path == STDOUT:
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such path; stdout replaced by a non-file
        return False


def _is_null(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def _same_file(a: str, b: str) -> bool:
    """Whether writing ``a`` would clobber ``b`` (symlinks, ``./x`` and ``x``, hard links and
    stdout spelled two ways all count; several writes to the null device do not)."""
    if STDOUT in (a, b):
        return a == b or _is_stdout(a) and _is_stdout(b)
    return modelio.same_file(a, b) and not _is_null(a)


def _check_paths(args, output: str) -> List[str]:
    """Refuse bad or colliding paths before any work, so that an error never leaves a file
    behind. Returns the input's external data files."""
    if not os.path.exists(args.input):
        return []  # loading reports the missing input (not its default output's missing folder)
    in_data = modelio.data_files(args.input)
    report = args.report
    if not args.dry_run:
        if output == STDOUT:
            if in_data:
                raise UsageError("-o -: a model with external data needs a regular file, not stdout")
        else:
            modelio.check_writable(output, external=bool(in_data))
        if _same_file(args.input, output) and not args.in_place:
            raise UsageError(f"{output}: output is the input file; pass --in-place to overwrite it")
        for data in in_data:
            if _same_file(output, data):
                raise UsageError(f"{output}: output is a data file of the input {args.input}")
    if report:
        if report != STDOUT:
            modelio.check_writable(report)
        if not args.dry_run and _is_stdout(report) and _is_stdout(output):
            raise UsageError("--report and -o both write to stdout")
        named = [("the input model", args.input)] + [(f"a data file of the input ({d})", d) for d in in_data]
        if not args.dry_run:
            named.append(("the output model", output))
            if output != STDOUT:
                named += [(f"a data file of the output {output}", d) for d in modelio.data_files(output)]
        for what, path in named:
            if _same_file(report, path):
                raise UsageError(f"{report}: --report would overwrite {what}")
    return in_data


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like KeyboardInterrupt so that it takes the same clean way out."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the command runs, SIGTERM raises _Terminated instead of killing the process, so an
    interrupted write removes its temp files. Only the CLI does this (importing onnxrep changes
    no handler); the previous handler is restored; an ignored SIGTERM stays ignored; outside
    the main thread signals are left alone."""
    previous = signal.getsignal(signal.SIGTERM)
    installed = False
    if previous not in (signal.SIG_IGN, None):
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
            installed = True
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _identity(path: str):
    """What tells whether a file was replaced or rewritten (None: it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _write_report(path: str, text: str) -> None:
    if path != STDOUT:
        modelio.write_text(path, text)
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        raise OnnxrepError(f"stdout: cannot write: {os.strerror(exc.errno) if exc.errno else exc}") from exc


def _stdout_bytes():
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        raise UsageError("-o -: stdout does not take bytes here")
    sys.stdout.flush()
    return stream


def _line(text: str) -> str:
    """``text`` as one printable line: line breaks and other control characters in names a
    model chose are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _size(paths: List[str]) -> Optional[int]:
    """Bytes of these regular files together (None when one is not a regular file)."""
    try:
        found = [os.stat(p) for p in paths]
    except OSError:
        return None
    return sum(st.st_size for st in found) if all(stat.S_ISREG(st.st_mode) for st in found) else None


def _failure_report(args, status: str, error: str) -> None:
    """With --report, a run that produced no model still says why, in the same JSON schema.
    Best effort: a report that cannot be written does not hide the error already printed."""
    if not args.report:
        return
    with contextlib.suppress(OnnxrepError, OSError, ValueError):
        if args.report != STDOUT:
            modelio.check_writable(args.report)
            if any(_same_file(args.report, p) for p in [args.input, *modelio.data_files(args.input)]):
                return
        _write_report(args.report, json.dumps(failure_dict(args.input, status, error), indent=2) + "\n")


class _Progress:
    """One line on a terminal's stderr saying what the run is doing ("rewriting: 120 rewrites");
    nothing when stderr is not a terminal or with -q. Cleared when the run is done."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False

    def __call__(self, stage: str, count: Optional[int] = None) -> None:
        if not self.enabled:
            return
        text = f"onnxrep: {stage}" + (f": {count}" if count is not None else "") + " ..."
        sys.stderr.write("\r\x1b[K" + text)
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # onnxrep's own sessions are silent (modelio.session); onnx-graphsurgeon's constant folding
    # builds its sessions with default options, which follow this process-wide logger.
    ort.set_default_logger_severity(runtime.QUIET)
    runtime.tune_allocator()  # the command line owns its process (docs/architecture.md, "Memory")
    if args.output and args.output_pos and args.output != args.output_pos:
        print(f"onnxrep: error: two outputs given: {args.output_pos} and -o {args.output} (see --help)", file=sys.stderr)
        return EXIT_INPUT
    output = args.output or args.output_pos or default_output(args.input)
    with _sigterm_interrupts():
        return _run(args, output)


def _run(args, output: str) -> int:
    written: List[str] = []
    targets = [p for p in ([] if args.dry_run else [output]) + [args.report] if p and p != STDOUT]
    before = {p: _identity(p) for p in targets}
    progress = _Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        shapes = parse_shapes(args.input_shape, args.input)
        in_data = _check_paths(args, output)
        # A report or model on stdout must stay parseable: the summary goes to stderr then.
        to_stdout = (args.report and _is_stdout(args.report)) or (not args.dry_run and _is_stdout(output))
        summary_stream = sys.stderr if to_stdout else sys.stdout
        with optimized(
            args.input,
            progress=progress,
            input_shapes=shapes,
            rtol=args.rtol,
            atol=args.atol,
            only=args.only,
            skip=args.skip,
            enable=args.enable,
            verify=not args.no_verify,
            verify_draws=args.verify_draws,
            seed=args.seed,
            allow_growth=args.allow_growth,
            rollback=not args.no_rollback,
        ) as (model, report):  # a large result waits in a temporary file until it is written
            progress.done()
            report.input_bytes = _size([args.input, *in_data])
            if args.no_verify:
                print("onnxrep: WARNING: --no-verify: the result is NOT checked against the original", file=sys.stderr)
            if not args.dry_run:
                external = report.external_data or model.needs_external_data()
                if output == STDOUT:
                    modelio.save(model, _stdout_bytes(), external)
                else:
                    # Data files that must survive the replacement of the previous output: the
                    # input's (unless it is the file being replaced) and the report.
                    keep = [args.input, *([] if args.in_place else in_data),
                            *([args.report] if args.report and args.report != STDOUT else [])]
                    data = modelio.save(model, output, external, keep=keep)
                    report.output_bytes = _size([output] + ([data] if data else []))
                written.append(output)
                report.output = output
        if args.report:
            try:
                _write_report(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
            except OnnxrepError as exc:
                raise OnnxrepError(f"{exc} (the model was written to {output})" if written else str(exc)) from exc
        if not args.quiet:
            try:
                print(report.summary(verbose=args.verbose), file=summary_stream)
                summary_stream.flush()
            except BrokenPipeError:  # `onnxrep ... | head`: the reader has all it wanted
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), summary_stream.fileno())
        return EXIT_OK
    except VerificationError as exc:
        progress.done()
        print(_line(f"onnxrep: error: {exc}"), file=sys.stderr)
        _failure_report(args, "verification_failed", str(exc))
        return EXIT_VERIFY
    except UsageError as exc:
        progress.done()
        print(_line(f"onnxrep: error: {exc}"), file=sys.stderr)
        return EXIT_INPUT
    except OnnxrepError as exc:
        progress.done()
        print(_line(f"onnxrep: error: {exc}"), file=sys.stderr)
        if not written:
            _failure_report(args, "error", str(exc))
        return EXIT_INPUT
    except KeyboardInterrupt as exc:
        progress.done()
        terminated = isinstance(exc, _Terminated)
        changed = [p for p in targets if _identity(p) != before[p]]
        done = f"after writing {', '.join(changed)}" if changed else "nothing written"
        print(f"onnxrep: interrupted ({'SIGTERM' if terminated else 'SIGINT'}); {done}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except MemoryError as exc:  # sizes a model declares (absurd dims) are the usual cause
        progress.done()
        changed = [p for p in targets if _identity(p) != before[p]]
        done = f"after writing {', '.join(changed)}" if changed else "nothing written"
        print(_line(f"onnxrep: error: {args.input}: out of memory ({first_line(exc)}); {done}"), file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # a bug: still one line, traceback only with -v
        progress.done()
        if args.verbose:
            traceback.print_exc()
        print(_line(f"onnxrep: internal error on {args.input}: {type(exc).__name__}: {first_line(exc)} "
                    "(nothing written; -v shows the traceback)"), file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        progress.done()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
