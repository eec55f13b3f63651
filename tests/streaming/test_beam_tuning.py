"""Beam's per-run costs trimmed by streaming/beam_tuning.py: same answers, asked once."""
from __future__ import annotations

import time

import apache_beam as beam
import pytest
from apache_beam.transforms import core, userstate
from apache_beam.transforms.userstate import BagStateSpec

from unirec.streaming import beam_tuning, microbatch, transforms
from unirec.streaming.transforms import BatchSpec, ParseEvent, UpdateItemStats, UpdateUserSequence


@pytest.fixture(scope="module", autouse=True)
def tuned():
    beam_tuning.tune()


def _our_dofns():
    spec = BatchSpec(kinds={"clicks": "click"}, state_path="unused.sqlite")
    return [ParseEvent(spec), UpdateUserSequence(spec), UpdateItemStats(spec), transforms._Only("x"),
            microbatch._Label("users"), microbatch._ExpandPlan(), microbatch._WriteOutput("/tmp/x")]


def test_tuning_twice_wraps_beam_once():
    first = (userstate.get_dofn_specs, core.get_function_args_defaults)
    beam_tuning.tune()
    assert (userstate.get_dofn_specs, core.get_function_args_defaults) == first


def test_cached_signatures_are_beams_own_for_every_unirec_dofn():
    specs, args = userstate.get_dofn_specs.beam, core.get_function_args_defaults.beam
    for dofn in _our_dofns():
        for _ in range(2):                                   # the second answer comes from the cache
            assert userstate.get_dofn_specs(dofn) == specs(dofn)
            for name in ("process", "setup", "start_bundle", "finish_bundle", "teardown"):
                bound = getattr(dofn, name)
                unbound = getattr(type(dofn), name)
                assert core.get_function_args_defaults(bound) == args(bound), (type(dofn), name)
                assert core.get_function_args_defaults(unbound) == args(unbound), (type(dofn), name)
        assert type(dofn) in userstate.get_dofn_specs.unirec_cache


def test_a_cached_dofn_is_not_inspected_again(monkeypatch):
    dofn = _our_dofns()[0]
    core.get_function_args_defaults(dofn.process)
    userstate.get_dofn_specs(dofn)
    calls = []
    real = core.get_signature
    monkeypatch.setattr(core, "get_signature", lambda f: calls.append(f) or real(f))
    userstate.get_dofn_specs(type(dofn)(dofn.spec))         # a new instance of the same class
    core.get_function_args_defaults(type(dofn)(dofn.spec).process)
    assert calls == []


def test_callers_may_change_what_they_get_without_touching_the_cache():
    dofn = _our_dofns()[1]
    names, defaults = core.get_function_args_defaults(dofn.process)
    names.append("junk")
    state, timers = userstate.get_dofn_specs(dofn)
    state.add("junk")
    assert "junk" not in core.get_function_args_defaults(dofn.process)[0]
    assert "junk" not in userstate.get_dofn_specs(dofn)[0]


class _Stateful(beam.DoFn):                                  # a user's DoFn: Beam answers every time
    BUF = BagStateSpec("buf", beam.coders.VarIntCoder())

    def process(self, kv, buf=beam.DoFn.StateParam(BUF)):
        yield kv


def test_other_dofns_go_to_beam_every_time():
    state, _ = userstate.get_dofn_specs(_Stateful())
    assert [s.name for s in state] == ["buf"]
    assert _Stateful not in userstate.get_dofn_specs.unirec_cache
    assert all(k[0].__module__.startswith("unirec.") for k in core.get_function_args_defaults.unirec_cache)


def test_an_instance_with_a_method_of_its_own_is_not_cached():
    dofn = _our_dofns()[3]
    dofn.extra = _Stateful().process                           # a bound method set on the instance
    cache = userstate.get_dofn_specs.unirec_cache
    cache.pop(type(dofn), None)
    userstate.get_dofn_specs(dofn)
    assert type(dofn) not in cache


def test_bundles_wait_at_most_the_short_sampling_period_for_beams_state_sampler():
    """A finished bundle joins Beam's sampling thread, which sleeps up to its period: the
    FineTune bundle (seconds long) must not end ~0.2 s after its last step."""
    from apache_beam.runners.worker import statesampler

    sampler = statesampler.StateSampler("t", None)
    assert sampler.sampling_period_ms == beam_tuning.SAMPLING_PERIOD_MS
    sampler.start()
    time.sleep(1.0)                                       # long enough for the period to reach its maximum
    t0 = time.perf_counter()
    sampler.stop()
    assert time.perf_counter() - t0 < 0.1                 # Beam's default: up to 0.2 s
