"""Run the programs of a Triton launch concurrently in the interpreter: one thread per program.

Triton's interpreter (TRITON_INTERPRET=1) runs a grid's programs one after another, so a kernel
whose programs hand work to each other through memory (the grpo_loss forward: the last program
to take a ticket from an atomic counter reduces every program's partials) only ever runs in that
one order there, and programs that wait on each other would wait forever. Inside
`concurrent_programs()` every program of a launch runs in its own thread, all started before any
is waited on, as on a GPU where the programs of a grid run side by side: they finish in whatever
order the threads take, and a wait on another program ends.

What this shows is the logic (which program reads and writes what, when a wait ends): Python's
threads interleave at the granularity of interpreter operations, under one lock, so it says
nothing about a GPU's memory ordering (the kernel's release/acquire and barrier are what carry
that there). A wait that never ends (a counting bug) raises TimeoutError in every program once
`timeout` seconds have passed, instead of hanging the test session.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import time

from triton.runtime import interpreter as _interp


class _Launch:
    """Stands in for a kernel's Python function in one GridExecutor: each program becomes a
    thread; the last program's call starts it and then waits for all of them."""

    def __init__(self, fn, state):
        self.fn, self.state = fn, state
        # what the executor reads off the kernel's function: its signature (to bind the
        # arguments), name and globals (where it patches triton.language)
        self.__signature__ = inspect.signature(fn)
        self.__name__, self.__globals__ = fn.__name__, fn.__globals__
        self.threads, self.errors = [], []

    def __call__(self, **args):
        builder = _interp.interpreter_builder
        idx, dim = builder.grid_idx, builder.grid_dim

        def program():
            builder.grid_idx = idx  # thread-local (see concurrent_programs)
            try:
                self.fn(**args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the launching thread
                self.errors.append(e)

        t = threading.Thread(target=program, daemon=True)
        t.start()
        self.threads.append(t)
        if idx != tuple(d - 1 for d in dim):
            return
        end = time.monotonic() + self.state["timeout"]
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            self.state["abort"] = True  # every waiting program raises at its next atomic
            for t in self.threads:
                t.join()
            raise TimeoutError(f"{len(self.threads)} programs still waiting on each other after "
                               f"{self.state['timeout']} s")
        if self.errors:
            raise self.errors[0]


@contextlib.contextmanager
def concurrent_programs(timeout: float = 300.0):
    """Within the block, every interpreted launch runs its programs as concurrent threads."""
    builder_cls = type(_interp.interpreter_builder)
    local = threading.local()
    state = {"timeout": timeout, "abort": False}
    saved = {name: builder_cls.__dict__.get(name) for name in ("grid_idx", "create_atomic_rmw")}
    orig_rmw = builder_cls.create_atomic_rmw
    orig_init = _interp.GridExecutor.__init__

    def atomic_rmw(self, *args, **kwargs):
        if state["abort"]:
            raise TimeoutError("aborted: programs waited on each other past the timeout")
        time.sleep(0)  # a program polling a counter lets the others run
        return orig_rmw(self, *args, **kwargs)

    def init(self, fn, *args, **kwargs):
        orig_init(self, fn, *args, **kwargs)
        self.fn = _Launch(fn, state)

    # the program index becomes per thread; the instance's own attribute is shadowed by the
    # class's data descriptor until it is restored
    builder_cls.grid_idx = property(lambda self: getattr(local, "idx", None),
                                    lambda self, v: setattr(local, "idx", v))
    builder_cls.create_atomic_rmw = atomic_rmw
    _interp.GridExecutor.__init__ = init
    try:
        yield
    finally:
        _interp.GridExecutor.__init__ = orig_init
        for name, value in saved.items():
            if value is None:
                delattr(builder_cls, name)
            else:
                setattr(builder_cls, name, value)
