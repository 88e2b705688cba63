"""The compiled decoder (``compile_decode = "compile"``): the eager engine's tokens, plain and
self-speculative, greedy and sampled, and one graph for every round of every generation.

Most tests compile with ``backend="eager"`` (or a counting backend): dynamo traces the round
at its fixed shapes (fullgraph) and runs the traced graph without generating code, which
is what compiling changes in the engine (static shapes, one traced round, random numbers
drawn beforehand, the stop check every few rounds) at a fraction of inductor's compile
time. ``-m slow`` adds the same comparison through inductor's C++ code.
"""

import pytest
import torch
from test_speculative import PROMPTS, build, make_shifted_trunk
from torch._dynamo.testing import CompileCounter

from torchtitan_mtp.rollout import NativeRolloutEngine, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one intra-op thread (see conftest)."""


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    """Every test compiles from scratch (dynamo's caches are per process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    return make_shifted_trunk()  # drafts right about half the time: both accept paths


def generate(model, params, backend="eager", prompts=PROMPTS, **engine_kwargs):
    """(eager completions, compiled completions, the compiled engine)."""
    eager = NativeRolloutEngine(model, **engine_kwargs).generate(prompts, params)
    engine = NativeRolloutEngine(
        model, compile_decode="compile", compile_backend=backend, **engine_kwargs
    )
    return eager, engine.generate(prompts, params), engine


def assert_same_completions(eager, compiled, logprob_tol: float = 1e-9) -> None:
    for a, b in zip(eager, compiled, strict=True):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert b.logprobs == pytest.approx(a.logprobs, abs=logprob_tol)


@pytest.mark.parametrize("num_drafts", [0, 1, 2])
def test_compiled_greedy_decoding_emits_the_eager_tokens(model, num_drafts):
    """Rows of different lengths, a stop token, 24 tokens: token for token, and the same
    acceptance counts."""
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(5,))
    eager, compiled, engine = generate(model, params, speculative_tokens=num_drafts)
    assert_same_completions(eager, compiled)
    if num_drafts:
        reference = NativeRolloutEngine(model, speculative_tokens=num_drafts)
        reference.generate(PROMPTS, params)
        assert engine.last_spec_stats == reference.last_spec_stats
        assert 0.2 < engine.last_spec_stats.metrics()["mtp/accept_rate"] < 0.95


@pytest.mark.parametrize("num_drafts", [0, 2])
def test_compiled_sampling_draws_the_eager_samples(model, num_drafts):
    """The round's random numbers are drawn before it, in eager sampling's order: a seed
    gives the same samples, so the compiled engine samples eager's distribution (whose
    losslessness test_speculative checks)."""
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=8, top_p=0.9, seed=3)
    eager, compiled, _ = generate(model, params, speculative_tokens=num_drafts)
    assert_same_completions(eager, compiled)


def test_compiled_decoding_stops_on_stop_strings_like_eager():
    class Chars:
        def decode(self, ids):
            return "".join(chr(97 + i % 26) for i in ids)

    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=("k", "q"))
    eager, compiled, _ = generate(build(), params, speculative_tokens=2, tokenizer=Chars())
    assert_same_completions(eager, compiled)
    assert {c.finish_reason for c in compiled} == {"stop", "length"}


def test_one_graph_serves_every_round_and_every_prompt_length(model):
    """24 tokens are 10+ rounds: one compiled graph. Other prompt widths change the cache
    length L, which the graph takes as a symbol: still one graph."""
    counter = CompileCounter()
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    engine = NativeRolloutEngine(
        model, speculative_tokens=1, compile_decode="compile", compile_backend=counter
    )
    engine.generate(PROMPTS, params)
    assert counter.frame_count == 1
    for width in (1, 9):
        engine.generate([[7] * width] * len(PROMPTS), params)
    assert counter.frame_count == 1


def test_bad_compile_modes_are_refused(model):
    with pytest.raises(ValueError, match="compile_decode = 'fast': one of none, compile"):
        NativeRolloutEngine(model, compile_decode="fast")
    engine = NativeRolloutEngine(model, compile_decode="cudagraphs")
    with pytest.raises(ValueError, match="cudagraphs.*CUDA device"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))


@pytest.mark.slow
@pytest.mark.parametrize("num_drafts", [0, 2])
def test_inductor_compiled_decoding_emits_the_eager_tokens(model, num_drafts):
    """The real compiler (C++ on CPU: 15-30 s a graph on this model, cold); its float32
    log-probs round differently (5e-7)."""
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(5,))
    eager, compiled, _ = generate(model, params, backend="inductor", speculative_tokens=num_drafts)
    assert_same_completions(eager, compiled, logprob_tol=1e-5)
