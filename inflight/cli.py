"""`inflight`: the operator's command line (serve, relay, tracker, check-config, migrate, settings, netdata
refresh, contacts forget, domains check, suppressions)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import ssl
import sys
from typing import Any

import uvloop

from config.settings import ConfigError, Settings, load_settings, resolve_config_path
from config.tracking import ModeRefused, TrackingSettings
from inflight.domains import DnsResolver, check_domains
from inflight.service import ListenError, Listeners, Service
from inflight.supervisor import Slot, Supervisor, plan_slots
from monitoring.logs import configure_logging
from store import is_sqlite, migrate_store, open_store
from store.model import DashboardUser
from store.sqlite import sqlite_path
from tracker.dashboard.auth import PASSWORD_MIN_CHARS, hash_password
from tracker.netdata import missing_lists, network_specs, refresh
from tracker.recorder_process import RecordingFailed


def _fail(exc: ConfigError) -> SystemExit:
    for problem in exc.problems:
        print(f"config error: {problem}", file=sys.stderr)
    return SystemExit(2)


def _settings(args: argparse.Namespace) -> Settings:
    path = resolve_config_path(args.config)
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _fail(exc) from None


def _run(args: argparse.Namespace, *, relay: bool, tracker: bool) -> int:
    """Listen first (a busy address: one line, exit 1, nothing else touched), then serve in one process or in workers."""
    settings = _settings(args)
    configure_logging(settings.log.format, access_log=settings.log.access_log)
    try:
        listeners = Listeners.bind(settings, relay=relay, tracker=tracker)
    except ListenError as exc:
        print(exc, file=sys.stderr)
        return 1
    slots = plan_slots(settings, relay=relay, tracker=tracker)
    if len(slots) == 1:
        return _serve(settings, slots[0], listeners)
    return Supervisor(settings, listeners, slots, worker=lambda slot, inherited: _serve(settings, slot, inherited),
                      prepare=lambda: _prepare_store(settings)).run()


def _serve(settings: Settings, slot: Slot, listeners: Listeners) -> int:
    service = Service(settings, relay=slot.relay, tracker=slot.tracker,
                      listeners=listeners.serving(relay=slot.relay, tracker=slot.tracker), primary=slot.index == 0)
    try:
        # uvloop (libuv) is the production event loop: the tracker answers faster on it (`make bench`).
        uvloop.run(service.run_until_signalled())
    except ConfigError as exc:
        raise _fail(exc) from None
    except RecordingFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _prepare_store(settings: Settings) -> int:
    """Create or migrate the store once, before the workers open it, and check the modes stored at runtime."""
    problems = asyncio.run(_with_tracking(settings, lambda tracking: tracking.problems()))
    if problems:
        raise _fail(ConfigError(problems))
    return 0


async def _with_tracking(settings: Settings, action: Any) -> Any:
    async with TrackingSettings.opened(settings) as tracking:
        return await action(tracking)


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    warnings = missing_lists(settings, resolve_config_path(args.config))
    url = settings.store.url
    if not is_sqlite(url) or sqlite_path(url).exists():  # modes changed at runtime must still be available
        async def review(tracking: TrackingSettings) -> tuple[list[str], list[str]]:
            return await tracking.problems(), await tracking.overrides()

        try:
            problems, overrides = asyncio.run(_with_tracking(settings, review))
        except OSError as exc:  # never the URL: it may carry a password
            print(f"error: store unreachable ({type(exc).__name__}: {exc.strerror or exc})", file=sys.stderr)
            return 1
        if problems:
            raise _fail(ConfigError(problems))
        warnings += overrides
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {resolve_config_path(args.config)} ({len(settings.projects)} project(s))")
    return 0


def _settings_tracking(args: argparse.Namespace) -> int:
    """Print or set a project's tracking mode: the operator's twin of GET/PUT /v1/settings/tracking."""
    settings = _settings(args)
    project = settings.project(args.project)
    if project is None:
        known = ", ".join(p.id for p in settings.projects)
        print(f"error: unknown project {args.project!r} (known: {known})", file=sys.stderr)
        return 2

    if args.reset and args.mode is not None:
        print("error: give a MODE or --reset, not both", file=sys.stderr)
        return 2

    def act(tracking: TrackingSettings) -> Any:
        if args.reset:
            return tracking.reset(project, by="cli")
        return tracking.view(project) if args.mode is None else tracking.change(project, args.mode, by="cli")

    try:
        view = asyncio.run(_with_tracking(settings, act))
    except ModeRefused as refused:
        print(f"error: {refused}", file=sys.stderr)
        return 1 if refused.status == 409 else 2
    print(json.dumps(view))
    return 0


def _netdata_refresh(args: argparse.Namespace) -> int:
    """Download the configured network lists from their upstreams; a running tracker
    picks the new files up by itself within seconds."""
    settings = _settings(args)
    if not settings.tracker.network_lists:
        print("nothing to refresh: no [[tracker.network_lists]] in the configuration", file=sys.stderr)
        return 1
    failed = 0
    for result in refresh(network_specs(settings.tracker.network_lists)):
        if result.error:
            failed += 1
            kept = f"kept {result.path}" if result.path.exists() else f"nothing was kept: {result.path} does not exist yet"
            print(f"failed  {result.name}: {result.error} ({kept})", file=sys.stderr)
        elif result.skipped:
            print(f"skipped {result.name}: {result.skipped}")
        else:
            print(f"updated {result.name}: {result.entries} CIDRs -> {result.path}")
    return 1 if failed else 0


def _forget(args: argparse.Namespace) -> int:
    """GDPR erasure (Art. 17): works while the service runs, since SQLite WAL allows a second writer process."""
    settings = _settings(args)
    problem = address_problem(args.address)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.project is not None and settings.project(args.project) is None:
        print(f"error: no project {args.project!r} in the configuration", file=sys.stderr)
        return 2

    async def forget() -> tuple[int, int]:
        store = open_store(settings.store.url)
        await store.open()
        try:
            counts = await store.forget(args.address, project=args.project)
            # Mail already delivered still carries the address in its tokens: its later opens,
            # clicks and feedback are not recorded (the address is kept only as a hash).
            await store.remember_forgotten(args.address, project=args.project)
            return counts
        finally:
            await store.close()

    events, webhooks = asyncio.run(forget())
    print(f"forgot {args.address}: {events} event(s), {webhooks} pending webhook(s) deleted; "
          "later events from mail already delivered will not be recorded")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Apply the store's schema migrations now (every node also applies them at start, under a lock)."""
    settings = _settings(args)
    applied = asyncio.run(migrate_store(settings.store.url))
    print(f"migrated: {', '.join(applied)}" if applied else "store schema up to date")
    return 0


def _domains_check(args: argparse.Namespace) -> int:
    """DNS, certificate and /healthz of every tracking domain (or one project's): exit 1 when any is missing."""
    settings = _settings(args)
    projects = settings.projects
    if args.project is not None:
        project = settings.project(args.project)
        if project is None:
            print(f"error: no project {args.project!r} in the configuration", file=sys.stderr)
            return 2
        projects = (project,)
    domains = [(project.id, domain) for project in projects for domain in project.tracking_hosts]
    if not domains:
        print(f"no tracking_domains configured: links use tracker.public_url ({settings.tracker.public_url})")
        return 0
    context = ssl.create_default_context(cafile=args.ca_file)
    findings = asyncio.run(check_domains(settings, domains, DnsResolver(args.resolver, timeout=args.timeout),
                                         port=args.port, context=context, timeout=args.timeout))
    for finding in findings:
        print(finding.line())
    return 0 if all(finding.ok for finding in findings) else 1
def _users_add(args: argparse.Namespace) -> int:
    """Create or update a dashboard account; the password is read from the terminal (twice) or stdin."""
    settings = _settings(args)
    if args.project is not None and settings.project(args.project) is None:
        print(f"error: no project {args.project!r} in the configuration", file=sys.stderr)
        return 2
    email = args.email.strip().lower()
    if address_problem(email) is not None or "@" not in email:
        print(f"error: {args.email!r} is not an email address", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < PASSWORD_MIN_CHARS:
        print(f"error: use a password of at least {PASSWORD_MIN_CHARS} characters", file=sys.stderr)
        return 2

    async def save() -> None:
        store = open_store(settings.store.url)
        await store.open()
        try:
            await store.save_user(DashboardUser(email, hash_password(password), args.project, args.admin))
        finally:
            await store.close()

    asyncio.run(save())
    scope = f"project {args.project}" if args.project else "every project"
    print(f"saved {email}: {scope}, {'admin' if args.admin else 'read-only'}")
    return 0


def address_problem(address: str) -> str | None:
    """Why `address` cannot name a contact to erase, or None: an empty or malformed one would erase
    nothing and report success, and the operator would believe the person's data gone."""
    if not address.strip():
        return "give the contact's address or id (it is empty)"
    if any(ch.isspace() or not ch.isprintable() for ch in address):
        return f"{address!r} contains spaces or control characters; give one address or contact id"
    local, at, domain = address.rpartition("@")
    if at and (not local or "" in domain.split(".")):
        return f"{address!r} is not an address (expected local@domain.tld) nor a contact id"
    return None


def _suppressions(args: argparse.Namespace) -> int:
    """The operator's twin of /v1/suppressions: list, add or remove a project's suppressed addresses."""
    settings = _settings(args)
    if settings.project(args.project) is None:
        known = ", ".join(p.id for p in settings.projects)
        print(f"error: unknown project {args.project!r} (known: {known})", file=sys.stderr)
        return 2
    if (args.address is None) != (args.action == "list"):
        print(f"error: `suppressions {args.action}` {'takes no' if args.action == 'list' else 'needs an'} ADDRESS",
              file=sys.stderr)
        return 2

    async def act() -> int:
        store = open_store(settings.store.url)
        await store.open()
        try:
            if args.action == "list":
                for entry in await store.suppressions(args.project):
                    print(f"{entry.address}\t{entry.reason}\t{entry.at}\t{entry.detail}")
                return 0
            if args.action == "add":
                added = await store.suppress(args.project, args.address, reason="manual", detail="added with the CLI")
                print(f"{'added' if added else 'already suppressed'}: {args.address}")
                return 0
            removed = await store.unsuppress(args.project, args.address)
            print(f"{'removed' if removed else 'not suppressed'}: {args.address}")
            return 0 if removed else 1
        finally:
            await store.close()

    return asyncio.run(act())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inflight", description="Self-hosted mail-tracking SMTP relay.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", help="TOML file (default: $INFLIGHT_CONFIG, then config/dev.toml)")
        return sub

    def command(name: str, help_text: str, parent: argparse._SubParsersAction = commands) -> argparse.ArgumentParser:
        return with_config(parent.add_parser(name, help=help_text))

    command("serve", "relay and tracker in one process").set_defaults(func=lambda a: _run(a, relay=True, tracker=True))
    command("relay", "the SMTP relay only").set_defaults(func=lambda a: _run(a, relay=True, tracker=False))
    command("tracker", "the HTTP tracker only").set_defaults(func=lambda a: _run(a, relay=False, tracker=True))
    command("check-config", "validate the configuration and exit").set_defaults(func=_check_config)
    command("migrate", "apply the store's schema migrations and exit").set_defaults(func=_migrate)
    settings = commands.add_parser("settings", help="runtime settings stored in the database").add_subparsers(
        dest="setting", required=True)
    tracking = with_config(settings.add_parser("tracking", help="print or set a project's tracking mode (no restart needed)"))
    tracking.add_argument("project", help="project id")
    tracking.add_argument("mode", nargs="?", help="ENABLED | DISABLED | MARKETING_ONLY; omit to print the current settings")
    tracking.add_argument("--reset", action="store_true", help="forget the mode set at runtime: follow the TOML value again")
    tracking.set_defaults(func=_settings_tracking)
    netdata = commands.add_parser("netdata", help="network lists of machine traffic").add_subparsers(dest="action", required=True)
    command("refresh", "download the configured lists from their official upstreams", netdata).set_defaults(func=_netdata_refresh)
    contacts = commands.add_parser("contacts", help="act on one contact's data").add_subparsers(dest="action", required=True)
    forget = command("forget", "delete every event of a contact and its pending webhooks (GDPR erasure)", contacts)
    forget.add_argument("address", help="the contact id or recipient address")
    forget.add_argument("--project", help="only this project (default: every project)")
    forget.set_defaults(func=_forget)
    domains = commands.add_parser("domains", help="the projects' tracking domains").add_subparsers(dest="action", required=True)
    check = command("check", "DNS, HTTPS certificate and /healthz of each tracking domain; exit 1 if any is missing", domains)
    check.add_argument("project", nargs="?", help="only this project's domains (default: every project's)")
    check.add_argument("--resolver", help="ask this nameserver, HOST[:PORT] (default: the system's)")
    check.add_argument("--port", type=int, default=443, help="HTTPS port of the reverse proxy (default: 443)")
    check.add_argument("--ca-file", help="PEM of the CAs to trust (default: the system's)")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per DNS query and per connection (default: 5)")
    check.set_defaults(func=_domains_check)
    suppressions = command("suppressions", "a project's suppression list (refused at RCPT)")
    suppressions.add_argument("action", choices=("list", "add", "remove"))
    suppressions.add_argument("project", help="project id")
    suppressions.add_argument("address", nargs="?", help="the address to add or remove")
    suppressions.set_defaults(func=_suppressions)
    users = commands.add_parser("users", help="dashboard accounts").add_subparsers(dest="action", required=True)
    add = command("add", "create or update a dashboard account (password from the terminal or stdin)", users)
    add.add_argument("email")
    add.add_argument("--project", help="limit the account to this project (default: every project)")
    add.add_argument("--admin", action="store_true", help="may change settings and retry webhooks (default: read-only)")
    add.set_defaults(func=_users_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
