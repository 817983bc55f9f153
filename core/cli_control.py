"""`kvmkit list|status|pause|resume|stop|kill|console`: talk to running VMs.

The control and console modules are imported by the commands that use them,
so that registering these commands costs ``kvmkit run`` nothing."""
from __future__ import annotations

import argparse
import sys


def _result(name: str, reply: dict):
    """The result of an answer from VM ``name``; an error answer is a ControlError."""
    if not reply.get("ok"):
        from .control import ControlError
        raise ControlError(f"{name}: {reply.get('error', 'the VM refused the request')}")
    return reply["result"]


def _answer(name: str, cmd: str, wait_s: float | None = 10, **args):
    from .control import request
    return _result(name, request(name, cmd, wait_s, **args))


def _describe(s: dict) -> str:
    return (f"{s['name']}: {s['state']}, {s['vcpus']} vCPU(s), {s['memory'] >> 20} MiB, "
            f"up {s['uptime']:.0f} s, {s['exits_total']} exits")


def stop_timeout(text: str) -> float:
    """``--timeout``: seconds, a finite number from 0 to a day."""
    from .control import MAX_STOP_TIMEOUT, check_stop_timeout
    try:
        return check_stop_timeout(float(text))
    except ValueError:                      # not a number, or RequestError: out of range
        raise argparse.ArgumentTypeError(f"expected seconds from 0 to {MAX_STOP_TIMEOUT:g}, "
                                         f"got {text!r}") from None


def cmd_list(args) -> int:
    from .control import running_vms
    names = running_vms()
    if args.json:
        import json
        print(json.dumps([_answer(n, "status") for n in names]))
        return 0
    if not names:
        print("no VMs are running")
    for name in names:
        print(_describe(_answer(name, "status")))
    return 0


def cmd_status(args) -> int:
    s = _answer(args.name, "status")
    if args.json:
        import json
        print(json.dumps(s, indent=2))
        return 0
    print(_describe(s))
    print(f"  devices: {', '.join(s['devices']) or 'none'}")
    print("  exits: " + (", ".join(f"{k} {v}" for k, v in s["exits"].items()) or "none"))
    for v in s.get("vcpu_exits", ()):
        rip = f", RIP {v['rip']}" if v.get("rip") else ""
        print(f"  vCPU {v['index']}: {v['exits']} exits, last {v['last_exit']}{rip}")
    return 0


def cmd_pause(args) -> int:
    print(_describe(_answer(args.name, "pause")))
    return 0


def cmd_resume(args) -> int:
    print(_describe(_answer(args.name, "resume")))
    return 0


def _stop_and_wait(name: str, cmd: str, wait: bool, on_result=None, **args) -> None:
    """Send ``cmd`` (kill or stop), and with ``wait`` "wait" after it on the
    same connection, then say how the VM ended; ``on_result(result)`` gets
    ``cmd``'s result as soon as it comes."""
    from .control import exchange
    results: list = []

    def answered(reply: dict) -> None:
        results.append(_result(name, reply))
        if len(results) == 1 and on_result is not None:
            on_result(results[0])
    exchange(name, [(cmd, args, 10)] + ([("wait", {}, None)] if wait else []), answered)
    if not wait:
        return
    if len(results) < 2:                        # it went before it could answer
        print(f"kvmkit: {name}: stopped (it ended before it could report its exit status)")
    else:
        print(f"kvmkit: {name}: {results[1]['reason']} (exit status {results[1]['exit_code']})")


def cmd_stop(args) -> int:
    def forced(result: dict) -> None:
        if not result.get("graceful"):
            print(f"kvmkit: {args.name}: no device can ask the guest to shut down; stopping it "
                  "by force", file=sys.stderr)
    _stop_and_wait(args.name, "stop", args.wait, forced, timeout=args.timeout)
    return 0


def cmd_kill(args) -> int:
    _stop_and_wait(args.name, "kill", args.wait)
    return 0


def cmd_console(args) -> int:
    from .console import attach
    return attach(args.name)


def add_commands(sub) -> None:
    p = sub.add_parser("list", help="list running VMs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("status", help="a running VM's state, devices and exit counts")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    for name, func, text in (("pause", cmd_pause, "pause every vCPU and device thread"),
                             ("resume", cmd_resume, "resume a paused VM")):
        p = sub.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(func=func)
    p = sub.add_parser("stop", help="ask the guest to shut down (Ctrl-Alt-Del); force after a timeout")
    p.add_argument("name")
    p.add_argument("--timeout", type=stop_timeout, default=30.0, help="seconds before forcing (30)")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return at once")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("kill", help="stop a VM now")
    p.add_argument("name")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return at once")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("console", help="attach to a detached VM's console (Ctrl-] detaches)")
    p.add_argument("name")
    p.set_defaults(func=cmd_console)

