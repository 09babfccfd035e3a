"""``loratune`` subcommands: parse flags, call the library function, show what a person needs.

Exit codes: 0 success; 2 bad input (one line on stderr naming the field or file, no traceback);
1 internal error (traceback only with ``--debug``); 130 interrupted (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from typing import Sequence

from loratune.cli.adapter import register as adapter_commands
from loratune.cli.progress import Renderer
from loratune.cli.report import register as report_commands
from loratune.cli.serve import register as serve_command
from loratune.cli.tune import register as tune_command
from loratune.errors import Diverged, InputError, Interrupted

log = logging.getLogger("loratune")


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loratune", description="Fine-tune transformers with LoRA; search LoRA settings.")
    p.add_argument("--version", action="version", version=f"loratune {__import__('loratune').__version__}",
                   help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="`loratune COMMAND --help` lists its flags")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="debug logging; tracebacks on internal errors")

    adapter_commands(sub, common)
    tune_command(sub, common)
    report_commands(sub, common)
    serve_command(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or _config_debug(args)
    if debug:
        args.debug = True
    ui = Renderer()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)   # a failed hub request: our one-line error says it
    try:
        return int(args.func(args, ui) or 0)
    except InputError as e:
        ui.err(f"loratune {args.command}: error: {e}")
        return 2
    except Interrupted as e:
        ui.err(f"loratune {args.command}: {e}; continue with --resume")
        return 130
    except KeyboardInterrupt:
        ui.err(f"loratune {args.command}: interrupted")
        return 130
    except Diverged as e:
        ui.err(f"loratune {args.command}: {e}")
        return 1
    except BrokenPipeError:                                   # `loratune predict ... | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback unless asked
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            ui.err(f"loratune {args.command}: error: disk full while writing {e.filename or 'a file'} ({e.strerror});"
                   " files are written atomically, so the last good checkpoint is kept: free space, then --resume")
            return 1
        if debug:
            traceback.print_exc()
        ui.err(f"loratune {args.command}: internal error: {type(e).__name__}: {e}"
               + ("" if debug else " (run with --debug for the traceback)"))
        return 1
    finally:
        ui.close()


def _config_debug(args: argparse.Namespace) -> bool:
    """``debug: true`` in ``--config`` (a YAML key like every training flag, DESIGN.md). A file that cannot be read
    is the command's to report (cli/common.read_yaml, exit 2): here it only means no debug."""
    from loratune.cli.common import config_debug

    if not getattr(args, "config", None):
        return False
    try:
        return config_debug(args.config)
    except InputError:
        return False


def run(argv: Sequence[str] | None = None) -> int:
    """The ``loratune`` command: :func:`main`, then a quick exit. The garbage main leaves is collected (its
    finalizers run), then what is still alive is frozen (``gc.freeze``), so the interpreter's exit does not
    walk the object graph of torch, transformers and Ray again: 0.5 s where it took 1.5 s (BENCHMARKS.md).
    Only for a process that ends next: a frozen object is never collected."""
    code = main(argv)
    import gc

    gc.collect()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(run())
