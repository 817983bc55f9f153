"""Device state for snapshots: one device's state as a plain value, and back.

:func:`save_device` turns what a device's guest (and host) did to it into a
JSON-able dict (dicts, lists, str, int, bool, None; bytes as hex), with a
``"version"``; :func:`restore_device` puts it into the same device kind
created afresh from the same configuration.  What is saved:

* for each virtio device the context put on the virtio-pci transport
  (``ctx.add_virtio``): the PCI config space (the BARs the guest programmed,
  the command register, MSI-X enable and function mask), the MSI-X table and
  pending bits, the transport's registers (status, features, selects, config
  generation, ISR, each queue's size, vector, enable bit and ring addresses),
  and each active queue's device-side indices (last_avail, used, the
  EVENT_IDX bookkeeping), whether a Python queue or a native engine runs it;
* for each plain PCI function (``ctx.add_pci``) its config space;
* the device's own state through its optional methods
  ``snapshot_state() -> dict`` and ``restore_state(state)`` (see
  docs/hooks.md).  A device with no virtio/PCI function and without these
  methods cannot be saved: :class:`StateUnsupported`.

Consistency: call :func:`save_device` while the machine is paused
(``Machine.pause``: vCPUs parked, the device lock held by the pause thread,
engines paused), from any thread; it does not take the device lock.  Chains
a native engine handed to Python are completed first, so each queue's
last_avail counts completed requests only and a restored guest never waits
for a request that was taken before the save.  A model that holds chains
across ``process`` calls must give them back in ``snapshot_state`` (see
virtio-net's receive buffers).

Save the devices before guest memory is written out: completing what was in
flight writes guest memory (used rings, request data, status bytes).

Restore: call :func:`restore_device` on a machine built from the same
configuration that has not run (no vCPU has entered the guest), with guest
memory already holding the saved RAM, and after the in-kernel irqchip (and
LAPIC) state is back, because it ends by raising an interrupt for each active
queue and kicking it: a guest takes a spurious interrupt in its stride, a
lost one could leave a driver waiting for ever.  The guest's register writes
are re-established with their side effects: GSI routes of the MSI-X vectors,
the BARs on the buses with their ioeventfds, MSI-X enable, the activated
device with its queues (and native engines) at the saved indices.
"""
from __future__ import annotations

from typing import Any

__all__ = ["STATE_VERSION", "StateUnsupported", "StateError", "save_device", "restore_device"]

STATE_VERSION = 1


class StateUnsupported(Exception):
    """The device's plugin has no state support: a snapshot is refused."""


class StateError(ValueError):
    """Saved state that does not fit the device it is restored into."""


def _unsupported(ctx, why: str = "") -> StateUnsupported:
    return StateUnsupported(f"device {ctx.name}: its plugin has no state support"
                            f"{f' ({why})' if why else ''}; a machine with it cannot be snapshotted")


def _runtimes(ctx) -> list:
    """The virtio-pci runtimes of a real DeviceContext."""
    return list(getattr(ctx, "virtio_runtimes", ()))


def _bare_models(ctx) -> list:
    """Virtio models of a FakeContext (kvmkit.testing): no transport."""
    if _runtimes(ctx):
        return []
    return [m for m in getattr(ctx, "virtio", ()) if hasattr(m, "queue_sizes")]


def _pci_configs(ctx) -> list:
    if hasattr(ctx, "pci_functions"):
        return [config for config, _mapper in ctx.pci_functions]
    return [config for config, _bars in getattr(ctx, "pci", ())]


def _own_state(ctx, obj) -> Any:
    """``obj.snapshot_state()``, checked to be JSON-able; a refusal names the device."""
    try:
        state = obj.snapshot_state()
    except StateUnsupported as e:
        message = str(e)
        if not message.startswith(f"device {ctx.name}"):
            raise StateUnsupported(f"device {ctx.name}: {message}") from None
        raise
    problem = _not_plain(state)
    if problem:
        raise StateError(f"device {ctx.name}: snapshot_state() returned {problem}; it must return "
                         "dicts with str keys, lists, str, int, float, bool and None only")
    return state


def _not_plain(value: Any, where: str = "state") -> str | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            problem = _not_plain(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"a non-str key {k!r} in {where}"
            problem = _not_plain(v, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    return f"a {type(value).__name__} at {where}"


def _models(ctx, device) -> list:
    return [rt.device for rt in _runtimes(ctx)] + _bare_models(ctx)


def save_device(ctx, device) -> dict:
    """The state of ``device`` (what its plugin's kvmkit_create_device
    returned, created with ``ctx``); see the module doc."""
    runtimes = _runtimes(ctx)
    bare = _bare_models(ctx)
    configs = _pci_configs(ctx)
    models = _models(ctx, device)
    own = device is not None and callable(getattr(device, "snapshot_state", None)) \
        and device not in models
    if not (runtimes or bare or configs or own):
        raise _unsupported(ctx, "the device has no snapshot_state()/restore_state() methods")
    state: dict = {"version": STATE_VERSION}
    # The transport first: it completes what engines handed to Python, and a
    # model's snapshot_state sees the queues quiet.
    if runtimes:
        state["virtio"] = [_save_runtime(ctx, rt) for rt in runtimes]
    if bare:
        state["virtio_models"] = [_save_bare(ctx, m) for m in bare]
    if configs:
        state["pci"] = [config.save_state() for config in configs]
    if own:
        state["device"] = _own_state(ctx, device)
    return state


def _save_runtime(ctx, runtime) -> dict:
    model = runtime.device
    saved = {"kind": type(model).__name__, "device_id": model.device_id}
    runtime.quiesce()
    if callable(getattr(model, "snapshot_state", None)):
        saved["model"] = _own_state(ctx, model)       # may give held chains back first
    saved.update(runtime.save_state())
    return saved


def _queue_layout(queue) -> dict:
    return {"size": queue.size, "desc_addr": queue.desc_addr, "avail_addr": queue.avail_addr,
            "used_addr": queue.used_addr, "event_idx": bool(queue.event_idx),
            "indirect": bool(queue.indirect), **queue.save_indices()}


def _save_bare(ctx, model) -> dict:
    """A model outside a VM (FakeContext): its queues as the test driver set
    them up, engines paused around the save."""
    host = getattr(model, "host", None)
    engines = dict(getattr(host, "engines", {}) or {})
    for engine in engines.values():
        engine.pause()
    try:
        for engine in engines.values():
            engine.service()
        saved = {"kind": type(model).__name__, "device_id": model.device_id}
        if callable(getattr(model, "snapshot_state", None)):
            saved["model"] = _own_state(ctx, model)
        saved["driver_features"] = model.driver_features
        saved["config_generation"] = model._config_generation
        saved["queues"] = [None if q is None else _queue_layout(q) for q in model.queues]
        return saved
    finally:
        for engine in engines.values():
            engine.resume()


def restore_device(ctx, device, state: dict) -> None:
    """Put ``state`` (from :func:`save_device`) into ``device``, freshly
    created with ``ctx`` from the same configuration; see the module doc.
    StateError when the state does not fit the device."""
    if not isinstance(state, dict) or not isinstance(state.get("version"), int):
        raise StateError(f"device {ctx.name}: the saved state is not a device state (no version)")
    if state["version"] != STATE_VERSION:
        raise StateError(f"device {ctx.name}: device state version {state['version']}; this kvmkit "
                         f"reads version {STATE_VERSION}")
    runtimes = _runtimes(ctx)
    bare = _bare_models(ctx)
    configs = _pci_configs(ctx)
    models = _models(ctx, device)
    _expect(ctx, "virtio devices", len(runtimes), len(state.get("virtio", ())))
    _expect(ctx, "virtio models", len(bare), len(state.get("virtio_models", ())))
    _expect(ctx, "PCI functions", len(configs), len(state.get("pci", ())))
    try:
        for runtime, saved in zip(runtimes, state.get("virtio", ())):
            _check_kind(ctx, runtime.device, saved)
            runtime.restore_state(saved)
            _restore_model(ctx, runtime.device, saved)
        for model, saved in zip(bare, state.get("virtio_models", ())):
            _check_kind(ctx, model, saved)
            _restore_bare(ctx, model, saved)
            _restore_model(ctx, model, saved)
        for config, saved in zip(configs, state.get("pci", ())):
            config.restore_state(saved)
        if "device" in state:
            restore = getattr(device, "restore_state", None)
            if device in models or not callable(restore):
                raise StateError(f"device {ctx.name}: the saved state has device state, but the "
                                 "device has no restore_state()")
            restore(state["device"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, StateError):
            raise
        raise StateError(f"device {ctx.name}: the saved state does not fit the device: "
                         f"{type(e).__name__}: {e}") from e
    for runtime in runtimes:
        runtime.after_restore()


def _expect(ctx, what: str, have: int, saved: int) -> None:
    if have != saved:
        raise StateError(f"device {ctx.name}: the saved state has {saved} {what}, the device "
                         f"has {have} (was the machine file changed?)")


def _check_kind(ctx, model, saved: dict) -> None:
    if saved.get("device_id") != model.device_id:
        raise StateError(f"device {ctx.name}: the saved state is of virtio device type "
                         f"{saved.get('device_id')}, the device is of type {model.device_id}")


def _restore_model(ctx, model, saved: dict) -> None:
    restore = getattr(model, "restore_state", None)
    if "model" in saved:
        if not callable(restore):
            raise StateError(f"device {ctx.name}: the saved state has model state, but "
                             f"{type(model).__name__} has no restore_state()")
        restore(saved["model"])


def _restore_bare(ctx, model, saved: dict) -> None:
    from .virtio.backends import PYTHON
    backend = getattr(model, "queue_backend", None) or PYTHON
    queues = []
    for layout in saved["queues"]:
        if layout is None:
            queues.append(None)
            continue
        queue = backend.split_queue(ctx.memory, layout["size"], layout["desc_addr"],
                                    layout["avail_addr"], layout["used_addr"],
                                    event_idx=layout["event_idx"],
                                    indirect=layout["indirect"])
        queue.restore_indices(layout)
        queues.append(queue)
    model._config_generation = int(saved["config_generation"])
    if queues:
        with ctx.lock:
            model.activate(queues, int(saved["driver_features"]))
