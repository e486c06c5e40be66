"""Before and after in one run: gpuledger from another tree (a git worktree of an older
commit) beside this one. A benchmark runs the baseline's job_submit.lua and daemon from
that tree and this tree's from here, interleaved, on the same machine and moment.

    git worktree add --detach /tmp/gl-base <commit>      # or --baseline-rev <commit>
    .venv/bin/python benchmarks/<bench>.py --baseline-tree /tmp/gl-base

Both run on this virtual environment's packages; the baseline's own ``ledger`` and
``slurm_plugin`` are put first on its ``sys.path`` (checked when it starts).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LUA = Path("slurm_plugin") / "lua" / "job_submit.lua"
# the gpuledger command of a tree: its packages first, checked, then its CLI root
_RUN = ("import sys; t = sys.argv.pop(1); sys.path.insert(0, t); "
        "import slurm_plugin.climain as c, ledger; "
        "assert all(m.__file__.startswith(t) for m in (ledger, c)), (c.__file__, t); "
        "sys.exit(c.main())")


def gpuledger(tree: Path) -> list[str]:
    """The ``gpuledger`` command line of ``tree`` (this tree: the same, explicitly)."""
    return [sys.executable, "-c", _RUN, str(tree.resolve())]


def lua_script(tree: Path) -> Path:
    return tree / LUA


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--baseline-tree", type=Path, metavar="PATH",
                    help="a checkout (git worktree) of the commit to compare with: its "
                         "job_submit.lua and daemon run beside this tree's")
    ap.add_argument("--baseline-rev", metavar="REV",
                    help="make a temporary worktree of REV as the baseline tree")


@contextlib.contextmanager
def baseline_tree(args: argparse.Namespace) -> Iterator[Path | None]:
    """The baseline tree the options name (a temporary worktree for --baseline-rev), or None."""
    if args.baseline_tree and args.baseline_rev:
        raise SystemExit("give --baseline-tree or --baseline-rev, not both")
    if args.baseline_tree:
        tree = args.baseline_tree.resolve()
        if not lua_script(tree).is_file() or not (tree / "ledger").is_dir():
            raise SystemExit(f"{tree} is not a gpuledger checkout (no {LUA})")
        yield tree
        return
    if not args.baseline_rev:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="gl-baseline-"))
    tree = tmp / "tree"
    out = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree),
                          args.baseline_rev], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"git worktree add {args.baseline_rev}: {out.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
