"""``kvmkit plugins`` and ``kvmkit check``: look at what is installed and at a
machine file, never starting a VM (and never opening ``/dev/kvm``)."""
from __future__ import annotations

import argparse
import os
import sys


def add_commands(sub, run_parser: argparse.ArgumentParser) -> None:
    """Register the two subcommands; ``check`` takes every flag ``run`` takes."""
    plugins = sub.add_parser(
        "plugins", help="list the installed device kinds and their machine-file keys",
        description="List every device kind installed (entry points in kvmkit.devices) with its "
        "distribution, version, summary and keys.  A plugin that fails to load is listed "
        "with its error.")
    plugins.add_argument("kinds", nargs="*", metavar="KIND", help="only these kinds")
    output = plugins.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    output.add_argument("--markdown", action="store_true",
                        help="print each kind's keys as the Markdown table of a plugin README")
    plugins.set_defaults(func=cmd_plugins)

    check = sub.add_parser(
        "check", parents=[run_parser], conflict_handler="resolve",
        help="validate a machine file (and flags) without starting the VM",
        description="Validate a machine file exactly as `kvmkit run` would (plugins, device "
        "keys, the host resources devices need, kernel and initrd files) without starting it.  "
        "Prints one `ok:` line and exits 0, or one line per problem found and exits 2.")
    check.set_defaults(func=cmd_check)


def cmd_plugins(args) -> int:
    from .catalog import load_installed
    entries = load_installed(args.kinds or None)
    try:
        return _print_plugins(entries, args.json, args.markdown)
    except BrokenPipeError:                  # `kvmkit plugins | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _print_plugins(entries, as_json: bool, as_markdown: bool = False) -> int:
    from .catalog import describe, format_key, markdown_table
    if as_json:
        import json
        json.dump([describe(e) for e in entries], sys.stdout, indent=2)
        print()
        return 0
    if as_markdown:
        for i, e in enumerate(entries):
            print(("\n" if i else "") + f"### `{e.kind}`\n")
            print(markdown_table(e.spec) if e.spec is not None else f"(broken: {e.error})")
        return 0
    if not entries:
        print("no device plugins are installed (pip install one, e.g. ./plugins/rtc)")
        return 0
    for i, e in enumerate(entries):
        if i:
            print()
        origin = f"{e.distribution} {e.version}" if e.distribution else e.target
        if e.spec is None:
            print(f"{e.kind}  ({origin})  BROKEN")
            print(f"    {e.error}")
            continue
        print(f"{e.kind}  ({origin})")
        print(f"    {e.spec.summary}")
        for key in e.spec.keys:
            print(f"    - {format_key(key)}")
        if not e.spec.keys:
            print("    (no keys)")
    broken = [e.kind for e in entries if not e.ok]
    if broken:
        print(f"kvmkit: warning: {len(broken)} plugin(s) failed to load: {', '.join(broken)}",
              file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    if getattr(args, "restore", None):
        from .cli_snapshot import prepare_restore
        from .preflight import format_size
        snap, config, _pm, _checked = prepare_restore(args)
        devices = ", ".join(t.kind for t in config.devices) or "none"
        print(f"ok: restore {snap.path}: {config.name}: {config.vcpus} vCPU"
              f"{'s' if config.vcpus != 1 else ''}, {format_size(config.memory)} memory, "
              f"devices: {devices} (the host's CPU is checked when it runs)")
        return 0
    from .config import Problems
    from .machine_flags import machine_config
    from .preflight import check_machine
    problems = Problems()
    config = machine_config(args, problems)
    checked = check_machine(config, problems=problems)
    if args.kernel is not None:
        kernel_line = check_kernel_config(checked.config.kernel.image, checked.kernel_data)
        print(f"ok: {checked.summary()}")
        print(kernel_line)
        return 0
    print(f"ok: {checked.summary()}")
    return 0


def check_kernel_config(path, data: bytes) -> str:
    """One line about ``path``'s embedded config: what the host-root guest
    (kvmkit sandbox) lacks raises ConfigError; otherwise what it has."""
    from .boot import kconfig
    from .config import ConfigError
    try:
        text = kconfig.embedded_config(data, str(path))
    except kconfig.KconfigError as e:
        raise ConfigError(f"--kernel {e}") from None
    if text is None:
        return (f"kernel config: {path} has no embedded config (CONFIG_IKCONFIG is off), so "
                "its options cannot be checked; kvmkit sandbox needs "
                + ", ".join(f"CONFIG_{n}" for n, _ in kconfig.REQUIRED) + " built in (=y)")
    verdict = kconfig.check_options(kconfig.parse(text))
    if not verdict.ok:
        raise ConfigError(f"--kernel {path}: kvmkit sandbox cannot boot it: missing "
                          + ", ".join(verdict.missing)
                          + " (build them in, =y; see `kvmkit sandbox --help`)")
    extra = ("; without " + ", ".join(verdict.missing_optional)) if verdict.missing_optional else ""
    return f"kernel config: {path} has every option kvmkit sandbox needs{extra}"
