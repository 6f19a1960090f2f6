"""``strata-client``: call the Strata agent's JSON-RPC API from a shell.

    strata-client [-s SOCKET | -a HOST:PORT [--cert C --key K --ca CA]] [--json] [--timeout S]
                  METHOD [name=value ...] [-f params.json] [--watch] [--request-id UUID] [-h]

Methods and params come from the agent's API document (``rpc.discover``); ``-h`` lists the
methods and ``METHOD -h`` describes one, from the packaged document when the agent is down.

A value is parsed as JSON where it is valid JSON, else taken as a string (a param whose schema
only takes strings keeps the text as typed, so ``repoId=2024`` stays a string). The ``size``
param takes bytes or binary units: ``10G``, ``512M``, ``1.5T``, ``4096``, ``64MiB``.
``-f FILE`` (``-f -``: stdin) gives a JSON object of params; name=value pairs override it.

Output: a table for list calls, ``key: value`` lines for objects, the bare value for strings
(``id=$(strata-client createVirtualDisk targetRepoId=default size=10G)``), nothing for null;
``--json`` prints the raw result as JSON. ``--watch`` follows the image that getImageStatus names
or that createVirtualDisk, createSnapshot or copyImage returns, with a progress line on stderr,
until it is optimized or degraded, or failed.

Every data-changing call (a method whose options take ``requestId``) is sent with
``options.requestId``: a fresh UUID, or the one ``--request-id`` gives. When no answer comes
(``--timeout``, a dropped connection) the call may have been carried out: the CLI says so and
prints the same command with ``--request-id``, which is safe to run again (the agent answers a
repeated requestId with the first call's result and does nothing new).

Exit codes:
    0    success
    1    the agent answered with an error (one line on stderr: NAME (code): message)
    2    usage error: bad arguments, unknown method or param, a param given twice, bad size
    3    cannot reach the agent (the socket path or address and the OS error on stderr)
    4    a watched operation failed (the image is broken with last_error), or with --all:
         a fix failed or a finding needs a person
    5    no answer (timeout, dropped connection) after the call was sent: it may have been
         carried out; stderr shows the command to retry it safely
    130  interrupted (Ctrl-C)

Keeping a repository healthy:
    strata-client checkStorageRepository repositoryId=R            what is left to do
    strata-client fixStorageRepository repositoryId=R --all         do it all, in a safe order
    strata-client fixStorageRepository repositoryId=R --all --types clean,merge

Listing a large repository (rpc/clilist.py):
    strata-client listImages repositoryId=R --limit 1000            one page, then --cursor C
    strata-client listImages repositoryId=R --all-pages             every page, one listing
    strata-client listImages repositoryId=R --status broken --user-data vm=web1
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import uuid
from collections.abc import Mapping
from typing import Any, NoReturn

from rpc import (
    cliagent,
    clierrors,
    clihelp,
    clilist,
    cliparams,
    clirender,
    cliwatch,
    fixall,
    transport,
)

PROG = clihelp.PROG
DEFAULT_SOCKET = "/run/strata/agent.sock"
SOCKET_ENV = "STRATA_SOCKET"
DEFAULT_TIMEOUT = 60.0

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WATCH_FAILED = 4
EXIT_NO_ANSWER = 5
EXIT_INTERRUPTED = 130

REQUEST_ID = "requestId"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

USAGE = (
    f"{PROG} [-s SOCKET | -a HOST:PORT [--cert C --key K --ca CA]] [--json] [--timeout S]\n"
    f"       {' ' * len(PROG)} METHOD [name=value ...] [-f params.json] [--watch] "
    "[--request-id UUID] [-h]\n"
    f"       {PROG} fixStorageRepository repositoryId=R --all [--types clean,merge]\n"
    f"       {PROG} listImages repositoryId=R [--kind K] [--status S,S] "
    "[--user-data KEY[=VALUE]]...\n"
    f"       {' ' * len(PROG)} [--limit N [--cursor C] | --all-pages [--limit N]]"
)
EPILOG = """\
values:
  name=value is parsed as JSON where it is valid JSON, else taken as a string;
  size=10G, 512M, 1.5T, 4096 (binary units K/M/G/T/P, optional iB/B) is integer bytes.
  -f FILE (- for stdin) gives a JSON object of params; name=value pairs override it.

exit codes:
  0    success
  1    the agent answered with an error
  2    usage error: bad arguments, unknown method or param, a param given twice, bad size
  3    cannot reach the agent
  4    a watched operation failed; with --all, a fix failed or needs a person
  5    no answer after the call was sent: it may have been carried out (stderr
       shows the command that retries it safely, with --request-id)
  130  interrupted

retries:
  every data-changing call carries options.requestId (fresh, or --request-id UUID);
  the same requestId again returns the first call's result and does nothing new

keeping a repository healthy:
  strata-client fixStorageRepository repositoryId=R --all [--types clean,merge]
      applies every fix checkStorageRepository proposes, in a safe order, following each
      (one line per fix on stdout, its progress on stderr as with --watch)

listing a large repository:
  strata-client listImages repositoryId=R --limit 1000          one page; stderr shows the
      command for the next one (--cursor C)
  strata-client listImages repositoryId=R --all-pages           every page, as one listing
  strata-client listImages repositoryId=R --status broken,degraded --user-data vm=web1
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise clierrors.UsageError(message)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, usage=USAGE, add_help=False, epilog=EPILOG,
                description="Call the Strata storage agent's JSON-RPC API.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("-s", "--socket", metavar="SOCKET",
                       help=f"the agent's Unix socket (default ${SOCKET_ENV}, else "
                       f"{DEFAULT_SOCKET})")
    where.add_argument("-a", "--address", metavar="HOST:PORT",
                       help="the agent's TCP address (TLS when --cert/--key/--ca are given)")
    p.add_argument("--cert", metavar="C", help="client certificate (PEM)")
    p.add_argument("--key", metavar="K", help="client key (PEM), if not in --cert")
    p.add_argument("--ca", metavar="CA", help="CA bundle that signed the agent's certificate")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--timeout", metavar="S", type=_positive_seconds, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("-f", dest="params_file", metavar="FILE",
                   help="a JSON object of params ('-' reads stdin); name=value overrides it")
    p.add_argument("--request-id", metavar="UUID", dest="request_id",
                   help="options.requestId of a data-changing call (default: a fresh UUID); "
                   "send the same one to retry a call safely")
    p.add_argument("--watch", action="store_true",
                   help="follow the image until it is optimized or failed (progress on stderr)")
    p.add_argument("--all", action="store_true",
                   help="fixStorageRepository: apply every proposed fix in a safe order and "
                   "follow each until done")
    p.add_argument("--types", metavar="T,T",
                   help="with --all: only these fix types (mend, merge, optimize, clean)")
    clilist.add_arguments(p)
    p.add_argument("-h", "--help", action="store_true",
                   help="list the methods; with METHOD, describe its params")
    p.add_argument("method", nargs="?", metavar="METHOD", help="an API method (listed below)")
    p.add_argument("params", nargs="*", metavar="name=value",
                   help="a param of METHOD: JSON, else a string; size=10G for sizes")
    return p


def endpoint(args: argparse.Namespace, environ: Mapping[str, str]) -> cliagent.Endpoint:
    if args.address is None:
        if args.cert or args.key or args.ca:
            raise clierrors.UsageError("--cert, --key and --ca go with -a HOST:PORT")
        return cliagent.Endpoint(socket=args.socket or environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    return cliagent.Endpoint(address=cliagent.parse_address(args.address),
                             tls=cliagent.tls_context(args.cert, args.key, args.ca))


def print_help(parser: argparse.ArgumentParser, agent: cliagent.Agent,
               method: str | None) -> int:
    doc = cliagent.help_document(agent)
    if method is None:
        print(parser.format_help())
        print(clihelp.format_method_list(doc))
    else:
        print(clihelp.format_method_help(doc, clihelp.find_method(doc, method)))
    return EXIT_OK


def emit(text: str | None) -> None:
    if text is not None:
        print(text, flush=True)


def takes_request_id(method: Mapping[str, Any]) -> bool:
    """Whether the method is data-changing: its options take a requestId."""
    for p in method.get("params", []):
        if p.get("name") == "options":
            return REQUEST_ID in p.get("schema", {}).get("properties", {})
    return False


def add_request_id(method: Mapping[str, Any], params: dict[str, Any],
                   given: str | None) -> tuple[str | None, bool]:
    """Put options.requestId into a data-changing call's params; return it, and whether the
    CLI made it up (so the retry command must add ``--request-id``)."""
    if not takes_request_id(method):
        if given is not None:
            raise clierrors.UsageError(
                f"--request-id goes with a data-changing call; {method.get('name')} changes "
                "nothing"
            )
        return None, False
    if given is not None and not _UUID.fullmatch(given):
        raise clierrors.UsageError(f"--request-id {given!r} is not a lower-case UUID")
    options = params.get("options", {})
    if not isinstance(options, dict):
        return None, False  # the agent refuses it, saying why
    inline = options.get(REQUEST_ID)
    if given is not None and inline is not None and inline != given:
        raise clierrors.UsageError("--request-id and options.requestId differ")
    request_id = given or inline
    made = request_id is None
    if request_id is None:
        request_id = str(uuid.uuid4())
    params["options"] = {**options, REQUEST_ID: request_id}
    return (request_id if isinstance(request_id, str) else None), made


def retry_command(argv: list[str], request_id: str, made: bool) -> str:
    return shlex.join([PROG, *argv, *(["--request-id", request_id] if made else [])])


def run_fix_all(args: argparse.Namespace, agent: cliagent.Agent) -> int:
    """``fixStorageRepository repositoryId=R --all [--types ...]``: converge a repository."""
    if args.method != "fixStorageRepository" or not args.all:
        raise clierrors.UsageError(
            "--all (and --types) go with: fixStorageRepository repositoryId=R --all"
        )
    if args.request_id is not None:
        raise clierrors.UsageError("--request-id names one call; --all sends many (each with "
                                   "its own)")
    params = cliparams.split_pairs(args.params)
    if set(params) != {"repositoryId"}:
        raise clierrors.UsageError("with --all, give only repositoryId=R")
    try:
        types = fixall.parse_types(args.types)
    except ValueError as e:
        raise clierrors.UsageError(str(e)) from None
    doc = agent.document()
    method = clihelp.find_method(doc, args.method)
    methods = {m.get("name") for m in doc.get("methods", [])}

    def call(name: str, call_params: Mapping[str, Any]) -> Any:
        sent = dict(call_params)
        if name == args.method:
            add_request_id(method, sent, None)  # each fix its own: a fix is never sent twice
        return agent.call(name, sent)

    def batch(calls: list[tuple[str, Mapping[str, Any]]]) -> list[Any]:
        sent: list[tuple[str, Mapping[str, Any]]] = []
        for name, call_params in calls:
            one = dict(call_params)
            if name == args.method:
                add_request_id(method, one, None)
            sent.append((name, one))
        return agent.call_batch(sent)

    try:
        _, failed, manual = fixall.fix_all(call, params["repositoryId"], types, sys.stdout,
                                           progress=cliwatch.Progress(sys.stderr),
                                           batch=batch, wait=fixall.WAIT_METHOD in methods)
    except cliagent.NoAnswer as e:
        raise cliagent.NoAnswer(
            f"{e}: the fix being applied may have been carried out; run the same command "
            "again, it applies only what the checker still proposes"
        ) from None
    return EXIT_OK if not failed and not manual else EXIT_WATCH_FAILED


def run_list(args: argparse.Namespace, agent: cliagent.Agent, params: dict[str, Any]) -> int:
    """``listImages`` with its flags: one page, or every page (clilist)."""
    if args.request_id is not None:
        raise clierrors.UsageError(f"--request-id goes with a data-changing call; "
                                   f"{args.method} changes nothing")
    clilist.prepare(args, params)
    result = (clilist.all_pages(agent.call, params) if args.all_pages
              else agent.call(args.method, params))
    emit(clilist.render(result, args.json, sys.stderr,
                        lambda cursor: clilist.next_page_command(args.argv, cursor)))
    return EXIT_OK


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, agent: cliagent.Agent) -> int:
    if args.help:
        return print_help(parser, agent, args.method)
    if args.method is None:
        raise clierrors.UsageError(f"a METHOD is needed ({PROG} -h lists them)")
    if args.all or args.types:
        return run_fix_all(args, agent)
    base = cliparams.load_params_file(args.params_file, sys.stdin) if args.params_file else {}
    doc = agent.document()
    method = clihelp.find_method(doc, args.method)
    params = cliparams.assemble_params(method, base, args.params)
    if clilist.given(args):
        return run_list(args, agent, params)
    if args.watch:
        cliwatch.check_watchable(args.method, params)
    request_id, made = add_request_id(method, params, args.request_id)
    try:
        result = agent.call(args.method, params)
    except cliagent.NoAnswer as e:
        if request_id is None:
            raise
        raise cliagent.NoAnswer(
            f"{e}: {args.method} may have been carried out (or may still be running). Retry it "
            "safely with the same request id: the agent returns the first call's result and "
            f"does nothing new:\n  {retry_command(args.argv, request_id, made)}"
        ) from None
    if not args.watch or args.method != cliwatch.STATUS_METHOD:
        emit(clirender.render_result(args.method, result, args.json))
    if args.watch:
        repo_id, image_id = cliwatch.watch_target(args.method, params, result)
        final = cliwatch.watch(agent, repo_id, image_id, cliwatch.Progress(sys.stderr))
        if args.method == cliwatch.STATUS_METHOD:
            emit(clirender.render_result(args.method, final, args.json))
    return EXIT_OK


def fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        agent = cliagent.Agent(endpoint(args, os.environ), args.timeout)
    except clierrors.UsageError as e:
        return fail(str(e), EXIT_USAGE)
    try:
        return run(args, parser, agent)
    except clierrors.UsageError as e:
        return fail(str(e), EXIT_USAGE)
    except transport.RemoteError as e:
        return fail(clirender.remote_error_line(e), EXIT_REMOTE_ERROR)
    except clierrors.Unreachable as e:
        return fail(str(e), EXIT_UNREACHABLE)
    except clierrors.WatchFailed as e:
        return fail(str(e), EXIT_WATCH_FAILED)
    except cliagent.NoAnswer as e:
        return fail(str(e), EXIT_NO_ANSWER)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # stdout went away (| head): quiet, and no second error when Python flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
