"""Command line: ``python -m onnxrep IN [-o OUT] [options]`` (also the ``onnxrep`` script).

Exit status: 0 written (or nothing to write with --dry-run), 1 verification failed, 2 bad input
or options, 3 internal error. Errors are one line on stderr; nothing is written on any error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from typing import Dict, List, Optional


import onnxruntime as ort

from . import __version__, modelio, runtime
from .core import optimize
from .errors import OnnxrepError, UsageError, VerificationError, first_line
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
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _check_writable(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory")


def _check_paths(args, output: str) -> None:
    """Refuse bad output paths before any work, so that an error never leaves a file behind."""
    if not os.path.exists(args.input):
        return  # loading reports the missing input (not its default output's missing folder)
    if not args.dry_run:
        if _same_file(args.input, output) and not args.in_place:
            raise UsageError(f"{output}: output is the input file; pass --in-place to overwrite it")
        _check_writable(output)
    if args.report:
        if _same_file(args.input, args.report):
            raise UsageError(f"{args.report}: --report would overwrite the input model")
        if not args.dry_run and os.path.abspath(args.report) == os.path.abspath(output):
            raise UsageError(f"{args.report}: --report would overwrite the output model")
        _check_writable(args.report)


def _file_mode(path: str) -> int:
    """The mode a plain open(path, "w") would give: the existing file's, else 0666 minus umask."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(data_writer, path: str) -> None:
    """Write through a temp file in the target folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".onnxrep-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        data_writer(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; give the usual mode instead
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def _line(text: str) -> str:
    """``text`` as one printable line: line breaks and other control characters in names a
    model chose are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # onnxrep's own sessions are silent (modelio.session); onnx-graphsurgeon's constant folding
    # builds its sessions with default options, which follow this process-wide logger.
    ort.set_default_logger_severity(runtime.QUIET)
    output = args.output or default_output(args.input)
    try:
        shapes = parse_shapes(args.input_shape, args.input)
        _check_paths(args, output)
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
        if not args.dry_run:
            modelio.write_model(model, output, atomic_write, report.external_data or modelio.needs_external_data(model))
            report.output = output
        if args.report:
            text = json.dumps(report.to_dict(), indent=2)
            atomic_write(lambda tmp: _write_text(tmp, text), args.report)
        if not args.quiet:
            print(report.summary(verbose=args.verbose))
        return EXIT_OK
    except VerificationError as exc:
        print(_line(f"onnxrep: error: {exc}"), file=sys.stderr)
        return EXIT_VERIFY
    except OnnxrepError as exc:
        print(_line(f"onnxrep: error: {exc}"), file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("onnxrep: interrupted; nothing written", file=sys.stderr)
        return 130
    except MemoryError as exc:  # sizes a model declares (absurd dims) are the usual cause
        print(_line(f"onnxrep: error: {args.input}: out of memory ({first_line(exc)}); nothing written"), file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # a bug: still one line, traceback only with -v
        if args.verbose:
            traceback.print_exc()
        print(_line(f"onnxrep: internal error on {args.input}: {type(exc).__name__}: {first_line(exc)} "
                    "(nothing written; -v shows the traceback)"), file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
