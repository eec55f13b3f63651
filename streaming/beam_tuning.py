"""Beam's fixed cost per run, trimmed for a driver that runs one bounded pipeline per micro-batch.

The driver re-runs the same pipeline proto on the in-process FnApiRunner for every
micro-batch (streaming/microbatch.py). Two of Beam's per-run costs do not depend on
the batch and dominate small ones (py-spy of the driver at 5,000 events/s offered,
ML-100k, ~0.45 s per batch):

* **DoFn introspection, ~28% of a batch's wall time.** Every run builds new bundle
  processors, and each rebuilds every DoFn's signature: `userstate.get_dofn_specs`
  wraps every method of the DoFn (`dir(dofn)`) to look for state and timer
  parameters, and `core.get_function_args_defaults` calls `inspect.signature` on each
  method, per DoFn, per stage, per run. `cache_dofn_introspection` memoises both for
  unirec's own DoFns only: their methods are defined on the class, so the answer is a
  function of the class (bound or not), and an instance carrying a method of its own
  as an attribute is not cached. Other DoFns (Beam's, a user's) go to Beam unchanged.
* **The state sampler's sleep, ~7%.** Each bundle's sampling thread sleeps up to
  200 ms between samples and the bundle's end joins it; `short_state_sampling`
  sets the period to 20 ms (the FineTune stage's seconds-long bundles ended up to
  0.2 s after their last step, idle; see streaming/finetune.py).

Beam has no option for either, so both patch a default or a module function, only if
Beam still has the shape they expect (otherwise Beam is left as it is), and only in a
process that runs micro-batches (`tune()` is called by the batch runner and the
FineTune stage). Measured with `bench/ingest.py` (ML-100k latency run at 5,000
events/s, 20 s): p50 / p95 arrival-to-online 0.71-0.77 / 0.96-1.09 s before (four
runs), 0.62-0.66 / 0.87-0.92 s after (four). The generated stream's latency is bound
by the push process, not by Beam, and did not move.
"""
from __future__ import annotations

import inspect
import types

SAMPLING_PERIOD_MS = 20
_OURS = "unirec."


def short_state_sampling(ms: int = SAMPLING_PERIOD_MS) -> None:
    """Beam's state sampling period for the bundles this process creates from now on: the
    longest a finished bundle waits for the sampling thread."""
    from apache_beam.runners.worker import statesampler

    init = statesampler.StateSampler.__init__
    last = list(inspect.signature(init).parameters)[-1]
    if last == "sampling_period_ms" and init.__defaults__ and init.__defaults__[-1] > ms:
        init.__defaults__ = init.__defaults__[:-1] + (ms,)   # another Beam: left as it is


def _ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith(_OURS)


def _cacheable_dofn(dofn) -> bool:
    """A unirec DoFn whose methods all come from its class (none set on the instance)."""
    return _ours(type(dofn)) and not any(isinstance(v, (types.MethodType, types.FunctionType))
                                         for v in getattr(dofn, "__dict__", {}).values())


def cache_dofn_introspection() -> None:
    """Memoise Beam's per-DoFn signature work for unirec's DoFns (see the module doc)."""
    from apache_beam.transforms import core, userstate

    specs = getattr(userstate, "get_dofn_specs", None)
    if specs is not None and not hasattr(specs, "unirec_cache"):
        spec_cache: dict = {}

        def get_dofn_specs(dofn):
            if not _cacheable_dofn(dofn):
                return specs(dofn)
            key = type(dofn)
            if key not in spec_cache:
                spec_cache[key] = specs(dofn)
            state, timers = spec_cache[key]
            return set(state), set(timers)      # callers may add to the sets they get

        get_dofn_specs.unirec_cache, get_dofn_specs.beam = spec_cache, specs
        userstate.get_dofn_specs = get_dofn_specs

    args = getattr(core, "get_function_args_defaults", None)
    if args is not None and not hasattr(args, "unirec_cache"):
        arg_cache: dict = {}

        def get_function_args_defaults(f):
            func = f.__func__ if isinstance(f, types.MethodType) else f
            if not (isinstance(func, types.FunctionType) and _ours(func)):
                return args(f)
            key = (func, isinstance(f, types.MethodType))   # bound: no `self` in the arguments
            if key not in arg_cache:
                arg_cache[key] = args(f)
            names, defaults = arg_cache[key]
            return list(names), list(defaults)

        get_function_args_defaults.unirec_cache, get_function_args_defaults.beam = arg_cache, args
        core.get_function_args_defaults = get_function_args_defaults


def tune() -> None:
    """Both of the above, for a process that runs micro-batches (idempotent)."""
    short_state_sampling()
    cache_dofn_introspection()
