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
import sys
import traceback
from typing import Dict, List, Optional


from . import __version__, modelio
from .core import optimize
from .errors import OnnxrepError, UsageError, VerificationError
from .rules import DEFAULT_RULES

EXIT_OK, EXIT_VERIFY, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error convention (argparse prints usage first by default)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"onnxrep: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    rules = "\n".join(f"  {r.name:24s} {r.summary}" for r in DEFAULT_RULES)
    p = _Parser(
        prog="onnxrep",
        description="Re-parameterize a training-structure ONNX model into its deploy structure, "
        "verified against the original with onnxruntime.",
        epilog=f"rules (default order):\n{rules}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="ONNX model to optimize (never modified unless --in-place)")
    p.add_argument("-o", "--output", help="where to write the result (default: INPUT with .rep.onnx)")
    p.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
        help="concrete shape for an input with dynamic dims (repeatable); a dynamic batch axis defaults to 1",
    )
    p.add_argument("--rtol", type=float, help="verification relative tolerance (default 1e-4; fp16 1e-2)")
    p.add_argument("--atol", type=float, help="verification absolute tolerance (default 1e-5; fp16 1e-3)")
    p.add_argument("--verify-draws", type=int, default=3, metavar="N", help="random input draws compared (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs (default 0)")
    p.add_argument("--only", action="append", default=[], metavar="RULE", help="run only this rule (repeatable)")
    p.add_argument("--skip", action="append", default=[], metavar="RULE", help="do not run this rule (repeatable)")
    p.add_argument(
        "--allow-growth", action="store_true",
        help="also apply rewrites that raise MACs (misaligned branches, 1x1 -> depthwise compositions, "
        "concat branches padded with zero taps)",
    )
    p.add_argument("--no-verify", action="store_true", help="write the result WITHOUT checking it (not recommended)")
    p.add_argument("--no-rollback", action="store_true", help="fail instead of dropping a rewrite that fails verification")
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
    p.add_argument("--in-place", action="store_true", help="allow OUTPUT to be the INPUT file itself")
    p.add_argument("--dry-run", action="store_true", help="optimize and verify, but write no model")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="store_true", help="list every rewrite and every declined match")
    p.add_argument("--version", action="version", version=f"onnxrep {__version__}")
    return p


def parse_shapes(items: List[str], label: str = "") -> Dict[str, List[int]]:
    prefix = f"{label}: " if label else ""
    shapes: Dict[str, List[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or min(values) <= 0:
            raise UsageError(f"{prefix}--input-shape {item!r}: expected NAME=D0,D1,... with positive integers")
        shapes[name] = values
    return shapes


def default_output(path: str) -> str:
    root = path[: -len(".onnx")] if path.endswith(".onnx") else path
    return root + ".rep.onnx"


def _same_file(a: str, b: str) -> bool:
    """Whether writing ``a`` would clobber ``b`` (symlinks, ``./x`` and ``x``, hard links)."""
    return modelio.same_file(a, b)


def _check_paths(args, output: str) -> List[str]:
    """Refuse bad or colliding paths before any work, so that an error never leaves a file
    behind. Returns the input's external data files."""
    if not os.path.exists(args.input):
        return []  # loading reports the missing input (not its default output's missing folder)
    in_data = modelio.data_files(args.input)
    report = args.report
    if not args.dry_run:
        modelio.check_writable(output, external=bool(in_data))
        if _same_file(args.input, output) and not args.in_place:
            raise UsageError(f"{output}: output is the input file; pass --in-place to overwrite it")
        for data in in_data:
            if _same_file(output, data):
                raise UsageError(f"{output}: output is a data file of the input {args.input}")
    if report:
        modelio.check_writable(report)
        named = [("the input model", args.input)] + [(f"a data file of the input ({d})", d) for d in in_data]
        if not args.dry_run:
            named.append(("the output model", output))
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


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    output = args.output or default_output(args.input)
    with _sigterm_interrupts():
        return _run(args, output)


def _run(args, output: str) -> int:
    targets = [p for p in ([] if args.dry_run else [output]) + [args.report] if p]
    before = {p: _identity(p) for p in targets}
    try:
        shapes = parse_shapes(args.input_shape, args.input)
        in_data = _check_paths(args, output)
        model, report = optimize(
            args.input,
            input_shapes=shapes,
            rtol=args.rtol,
            atol=args.atol,
            only=args.only,
            skip=args.skip,
            verify=not args.no_verify,
            verify_draws=args.verify_draws,
            seed=args.seed,
            allow_growth=args.allow_growth,
            rollback=not args.no_rollback,
        )
        if args.no_verify:
            print("onnxrep: WARNING: --no-verify: the result is NOT checked against the original", file=sys.stderr)
        written = False
        if not args.dry_run:
            external = report.external_data or modelio.needs_external_data(model)
            # Data files that must survive the replacement of the previous output: the
            # input's (unless it is the file being replaced) and the report.
            keep = [args.input, *([] if args.in_place else in_data), *([args.report] if args.report else [])]
            modelio.save(model, output, external, keep=keep)
            written = True
            report.output = output
        if args.report:
            try:
                modelio.write_text(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
            except OnnxrepError as exc:
                raise OnnxrepError(f"{exc} (the model was written to {output})" if written else str(exc)) from exc
        if not args.quiet:
            print(report.summary(verbose=args.verbose))
        return EXIT_OK
    except VerificationError as exc:
        print(f"onnxrep: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except OnnxrepError as exc:
        print(f"onnxrep: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        changed = [p for p in targets if _identity(p) != before[p]]
        done = f"after writing {', '.join(changed)}" if changed else "nothing written"
        print(f"onnxrep: interrupted ({'SIGTERM' if terminated else 'SIGINT'}); {done}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except Exception as exc:  # a bug: still one line, traceback only with -v
        if args.verbose:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"onnxrep: internal error on {args.input}: {type(exc).__name__}: {first} (nothing written; -v shows the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
