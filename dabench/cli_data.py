"""``dabench data``: list, download and verify the standard datasets.

    dabench data list [--data-root DIR] [--json]
    dabench data download NAME [--data-root DIR] [--progress] [--allow-http]
    dabench data verify NAME [--data-root DIR]

The data root is ``--data-root``, else ``$DABENCH_DATA``, else the per-user
cache (see :mod:`dabench.data.download`).  Exit codes: 0 success, 1 missing,
corrupt or unverified data (the message says which file, where it was looked
for and what to run), 2 an unknown dataset name.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXIT_DATA = 1
EXIT_BAD_INPUT = 2


def _status_line(st: Any) -> str:
    label = {"ok": "ok", "pinned": "ok (local pin)", "unverified": "UNVERIFIED", "extracted": "ok (extracted)",
             "missing": "MISSING", "bad": "BAD"}.get(st.state, st.state)
    sha = f"  sha256 {st.sha256}" if st.sha256 else ""
    trust = f"  [{st.trust}]" if st.trust else ""
    return f"  {label:<16} {st.path}{sha}{trust}"


def cmd_data(args: argparse.Namespace, console: Any) -> int:
    from .data.core import DataError
    from .data.download import DATASETS, get_dataset, mirror, resolve_data_root, summarize

    root = resolve_data_root(args.data_root)
    if args.data_command == "list":
        states = summarize(root)
        if args.json:
            console.out(json.dumps([{
                "name": s.dataset.name, "title": s.dataset.title, "files_present": s.present,
                "files": s.total, "hashes": s.hashes, "folder": str(s.folder), "domains": list(s.dataset.domains),
                "homepage": s.dataset.homepage, "licence": s.dataset.licence,
                "manual": bool(s.dataset.manual),
            } for s in states], indent=2))
            return 0
        console.info(f"{root.describe()}" + (f"; mirror {mirror()}" if mirror() else ""))
        rows = [(s.dataset.name, f"{s.present}/{s.total} files", s.hashes,
                 "manual download" if s.dataset.manual else "dabench data download " + s.dataset.name,
                 s.dataset.title) for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(4)] if rows else []
        for r in rows:
            console.out("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        return 0

    name = args.name
    if name not in DATASETS:
        try:
            get_dataset(name)
        except DataError as e:
            console.error(str(e))
        return EXIT_BAD_INPUT
    try:
        if args.data_command == "download":
            from .data.download import download

            console.info(f"{name}: {root.describe()}" + (f"; mirror {mirror()}" if mirror() else ""))
            if args.allow_http:
                import os

                from .data.download import ALLOW_HTTP_VAR

                os.environ[ALLOW_HTTP_VAR] = "1"
            statuses = download(name, root, progress=args.progress)
        else:
            from .data.download import verify

            statuses = verify(name, root)
    except DataError as e:
        console.error(str(e))
        return EXIT_DATA
    for st in statuses:
        console.out(_status_line(st))
    unverified = [st for st in statuses if st.state == "unverified"]
    if unverified:
        console.error(f"{len(unverified)} file(s) of {name!r} have no published hash and no local pin yet, so they "
                      f"cannot be verified; run `{root.command(name)}` to pin them (trust on first use)")
        return EXIT_DATA
    console.info(f"{name}: {len(statuses)} file(s) {'downloaded and ' if args.data_command == 'download' else ''}"
                 f"verified in {root.path / name}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser] | None = None) -> argparse.ArgumentParser:
    """Add the ``data`` command group to the CLI's subparsers."""
    p = subparsers.add_parser("data", parents=parents or [], help="list, download or verify the standard datasets")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    root_help = "data root (default: $DABENCH_DATA, else the per-user cache folder)"
    ls = sub.add_parser("list", help="the downloadable datasets and what is present")
    ls.add_argument("--data-root", metavar="DIR", help=root_help)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    dl = sub.add_parser("download", help="download (or take in place), verify and extract a dataset")
    dl.add_argument("name", metavar="NAME", help="a dataset of `dabench data list`, e.g. mnist")
    dl.add_argument("--data-root", metavar="DIR", help=root_help)
    dl.add_argument("--progress", action="store_true", help="show a progress bar (needs tqdm)")
    dl.add_argument("--allow-http", action="store_true",
                    help="accept plain-http downloads of files with no published hash and no local pin "
                         "(same as DABENCH_ALLOW_HTTP=1; they are pinned on first use)")
    vf = sub.add_parser("verify", help="check every file of a dataset against its sha256")
    vf.add_argument("name", metavar="NAME", help="a dataset of `dabench data list`, e.g. mnist")
    vf.add_argument("--data-root", metavar="DIR", help=root_help)
    for sp in (ls, dl, vf):
        sp.set_defaults(func=cmd_data)
    return p


__all__ = ["add_parser", "cmd_data"]
