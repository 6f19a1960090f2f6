"""``strata-client listImages`` flags: filters, one page at a time, or every page.

    strata-client listImages repositoryId=R [--kind K] [--status S,S] [--user-data KEY[=VALUE]]...
                  [--limit N [--cursor C] | --all-pages [--limit N]]

The flags are the call's options (``kind``, ``status``, ``userData``, ``limit``, ``cursor``); an
options param given too must not say otherwise. ``--user-data KEY=VALUE`` takes the value as
other values are (JSON where it is valid JSON, else a string); ``--user-data KEY`` only asks
that the key be there. With ``--limit`` one page is printed, and the command for the next page
goes to stderr while there is one. ``--all-pages`` fetches page after page (of ``--limit``,
default 1,000) until the last, and prints them as one listing: the way to list a repository
whose whole answer would pass the agent's ``[rpc] max_response_bytes``.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rpc import clierrors, clihelp, cliparams, clirender

METHOD = "listImages"
DEFAULT_PAGE = 1000
# However many pages --all-pages fetches, it stops rather than loop on an agent that keeps
# answering the same cursor.
MAX_PAGES = 1_000_000

Call = Callable[[str, Mapping[str, Any]], Any]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", metavar="N", type=_positive_int,
                   help="listImages: one page of at most N images (with --all-pages: the "
                   f"page size, default {DEFAULT_PAGE})")
    p.add_argument("--cursor", metavar="C",
                   help="listImages: the page after the one that gave this cursor")
    p.add_argument("--all-pages", action="store_true", dest="all_pages",
                   help="listImages: fetch every page and print them as one listing")
    p.add_argument("--kind", metavar="K", help="listImages: only disk or snapshot images")
    p.add_argument("--status", metavar="S,S",
                   help="listImages: only images of these statuses (broken, degraded, optimized)")
    p.add_argument("--user-data", metavar="KEY[=VALUE]", action="append", dest="user_data",
                   help="listImages: only images whose userData has KEY (=VALUE: that value); "
                   "may be given again")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def given(args: argparse.Namespace) -> bool:
    return bool(args.limit is not None or args.cursor is not None or args.all_pages
                or args.kind is not None or args.status is not None or args.user_data)


def flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the flags give."""
    out: dict[str, Any] = {}
    if args.kind is not None:
        out["kind"] = args.kind
    if args.status is not None:
        statuses = [s.strip() for s in args.status.split(",") if s.strip()]
        if not statuses:
            raise clierrors.UsageError("--status needs at least one status")
        out["status"] = statuses
    if args.user_data:
        wanted: dict[str, Any] = {}
        for item in args.user_data:
            key, sep, raw = item.partition("=")
            if not key:
                raise clierrors.UsageError(f"--user-data {item!r} is not KEY or KEY=VALUE")
            if key in wanted:
                raise clierrors.UsageError(f"--user-data {key!r} is given twice: give it once")
            wanted[key] = cliparams.parse_value(raw) if sep else None
        out["userData"] = wanted
    if args.limit is not None:
        out["limit"] = args.limit
    if args.cursor is not None:
        out["cursor"] = args.cursor
    return out


def merge(params: dict[str, Any], flags: Mapping[str, Any]) -> None:
    """Put the flags' options into params; an options param saying otherwise is refused."""
    options = params.get("options", {})
    if not isinstance(options, dict):
        raise clierrors.UsageError("options must be a JSON object to go with the listImages "
                                   "flags")
    for k, v in flags.items():
        if k in options and options[k] != v:
            raise clierrors.UsageError(f"options.{k} and the flag for it differ: give one")
    params["options"] = {**options, **flags}


def prepare(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """Check the flags go with the call and fold them into its params."""
    if args.method != METHOD:
        raise clierrors.UsageError(
            "--limit, --cursor, --all-pages, --kind, --status and --user-data go with "
            f"{METHOD}, not {args.method}")
    if args.watch:
        raise clierrors.UsageError(f"--watch does not go with {METHOD}")
    merge(params, flag_options(args))
    if args.all_pages:
        params["options"].setdefault("limit", DEFAULT_PAGE)
    elif args.cursor is not None and "limit" not in params["options"]:
        raise clierrors.UsageError("--cursor goes with --limit N (or --all-pages)")


def all_pages(call: Call, params: Mapping[str, Any]) -> list[Any] | dict[str, Any]:
    """Every page from the one params ask for to the last, as one call without a limit
    answers: the images, with withWarnings also the last page's warnings (each page has the
    repository's)."""
    sent = {**params, "options": dict(params["options"])}
    images: list[Any] = []
    page: Any = {}
    for _ in range(MAX_PAGES):
        page = call(METHOD, sent)
        if not isinstance(page, dict) or not isinstance(page.get("images"), list):
            raise clierrors.Unreachable(f"the agent answered {METHOD} with no page")
        images.extend(page["images"])
        cursor = page.get("nextCursor")
        if cursor is None:
            break
        if cursor == sent["options"].get("cursor"):
            raise clierrors.Unreachable(f"the agent answered {METHOD} with the same cursor "
                                        "again")
        sent["options"]["cursor"] = cursor
    if "warnings" in page:
        return {"images": images, "warnings": page["warnings"]}
    return images  # what one call without a limit answers


def render(result: Any, as_json: bool, err: TextIO, next_command: Callable[[str], str]
           ) -> str | None:
    """What a page (or all pages) prints: the table (or JSON) on stdout, and on stderr the
    warnings and the command that fetches the next page."""
    if as_json or not isinstance(result, dict) or not isinstance(result.get("images"), list):
        return clirender.render_result(METHOD, result, as_json)
    for w in result.get("warnings") or []:
        if isinstance(w, dict):
            print(f"{clihelp.PROG}: warning: {w.get('file')}: {w.get('error')}", file=err)
    cursor = result.get("nextCursor")
    if isinstance(cursor, str):
        print(f"{clihelp.PROG}: more images; the next page: {next_command(cursor)}", file=err)
    return clirender.render_list(METHOD, result["images"])


def next_page_command(argv: list[str], cursor: str) -> str:
    """The command line that was run, with --cursor naming the next page."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--cursor":
            skip = True
            continue
        if arg.startswith("--cursor="):
            continue
        out.append(arg)
    return shlex.join([clihelp.PROG, *out, "--cursor", cursor])
