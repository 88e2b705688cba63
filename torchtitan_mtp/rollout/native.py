"""The native rollout engine: batched KV-cache decoding on the training model itself,
plain or self-speculative with the model's own MTP modules.

gpt-fast style, pure PyTorch. The forward is the model's own: ``models.decode.Decoder``
runs the model's modules step by step with a static KV cache (see there how it handles
FSDP2, TP and the training wrappers), and this module is the decoding loop: prefill,
sampling, self-speculative drafting and verification, stopping.

Layout: every cache is indexed by token position, per row. Prompts are right-padded, and
each row writes its new tokens at its own positions, so rows may advance by different
numbers of tokens per step. A query at position p attends to keys 0..p of its row; stale
entries beyond a row's length (prompt padding, rejected drafts) are never attended to
before they are overwritten.

Self-speculative decoding (``speculative_tokens = K`` > 0), one round per step:

1. Draft: MTP module 1 at the last fed position predicts token m + 1 from h^0 and the last
   sampled token; module k predicts token m + k from module k - 1's hidden state and the
   draft of module k - 1 (chained, as in DeepSeek-V3 / MiMo). Drafts are greedy under
   greedy decoding and sampled from the MTP head's (filtered) distribution q otherwise.
2. Verify: one trunk forward over [last token, d_1 .. d_K] gives the target distributions
   p_0 .. p_K. Draft d_j is accepted with probability min(1, p(d_j) / q(d_j)) until the first
   rejection, which is replaced by a sample of norm(max(p - q, 0)); if all K are accepted,
   one more token is sampled from p_K (Leviathan et al. 2023; Chen et al. 2023). The output
   has exactly the distribution of plain sampling; under greedy decoding it is exactly the
   plain greedy sequence.

Module k's cache entry at position i depends on token i + k, so the last k - 1 entries of
each round depend on drafts: every round recomputes module k over the K + k positions that
end at the last fed one, which makes the drafts equal to what the training forward of the
MTP modules computes on the accepted sequence (teacher forcing).

Under tensor parallelism every TP rank decodes its heads; sampled tokens, drafts and
acceptance decisions are broadcast from the first TP rank so every rank continues
identically.

Compiled decoding (``compile_decode``, gpt-fast's recipe): a round (draft, verify, accept,
emit) is one function of device tensors, updated in place, that takes its random numbers
drawn beforehand (``_Noise``: the same draws, in the same order, as eager decoding, so a
seed gives the same tokens, up to the compiled kernels' rounding). ``"compile"`` runs it
through ``torch.compile(fullgraph=True)`` at fixed shapes: attention spans the whole static
cache (``end`` fixed), so one graph serves every round of a generation, and the cache
length is a symbol, so it also serves every prompt length (a new batch size or sampling
setting compiles once more).
``"cudagraphs"`` (CUDA) also captures the compiled round as one CUDA graph per generation
and replays it. The prefill, and with drafts the first round (its MTP modules run over the
whole prompt), stay eager. Host syncs on a GPU: none inside a round; the running-row count
is copied to the host asynchronously and read one round late (one idle round at the end);
stop strings (decoded on the host) sync every round, progress lines every few seconds.
Eager decoding (``"none"``) reads the longest row back every round instead and attends
over that span only; on CPU it can be the faster one for short answers (measure with
``benchmarks/rollout.py --compile-decode none,compile``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.tools.logging import logger

from ..models.decode import Decoder
from .base import Completion, SamplingParams, SpecDecodeStats

__all__ = [
    "COMPILE_MODES",
    "NativeRolloutEngine",
    "sample_tokens",
    "sampling_probs",
    "speculative_accept",
]

PAD_ID = 0
"""Token fed in padding columns and after a row finished; never attended to or returned."""

CompileMode = Literal["none", "compile", "cudagraphs"]
COMPILE_MODES: tuple[CompileMode, ...] = ("none", "compile", "cudagraphs")
"""``compile_decode`` values: eager rounds, ``torch.compile``d rounds, or compiled rounds
replayed as one CUDA graph (CUDA only)."""


def _broadcast(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The first TP rank's copy of a sampled tensor, so all TP ranks continue identically."""
    if group is not None:
        dist.broadcast(x, group=group, group_src=0)
    return x


def _at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] at per-row positions [B, T] -> [B, T, ...]."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(*positions.shape, *x.shape[2:]))


def _put(x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """x[b, positions[b, t]] = values[b, t] for x [B, L, ...], values [B, T, ...]."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2)))
    x.scatter_(1, index.expand(*values.shape), values)


# ---------------------------------------------------------------------------- sampling


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [..., V] of float32 logits [..., V]: temperature, top-k, top-p.

    Requires ``params.temperature > 0``.
    """
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One sample [...] of each distribution [..., V] (unnormalised is fine), without a host
    sync: argmax(p / E) with E ~ Exp(1), ``noise`` [..., V] drawn beforehand."""
    return (probs / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample tokens [...] from raw float32 logits [..., V] with temperature, top-k, top-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, params)
    return _draw(probs, torch.empty_like(probs).exponential_(1.0, generator=generator))


def speculative_accept(
    target_logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule: accepted draft count and the next token.

    Args:
        target_logits: [B, K + 1, V] float32 target logits at the positions that predict
            d_1 .. d_K and the token after d_K.
        drafts: [B, K] drafted tokens.
        draft_probs: [B, K, V] the distributions q the drafts were sampled from (None for
            greedy decoding, where drafts are argmaxes).
        params: the sampling parameters that define the target distribution p.

    Returns:
        (accepted [B] in 0..K, next [B]): d_1 .. d_accepted are kept and ``next`` follows
        them: the correction sampled from norm(max(p - q, 0)) after a rejection, or a sample
        of p_K when all K drafts were accepted. Greedy: drafts are kept while they equal the
        target argmax, and ``next`` is the target argmax.
    """
    noise = None
    if params.temperature > 0:
        (batch, num_drafts), vocab = drafts.shape, target_logits.shape[-1]
        noise = _Noise.empty(batch, 0, num_drafts, vocab, target_logits.device)
        noise.draw(generator)
    return _accept(target_logits, drafts, draft_probs, params, noise)


def _accept(
    target_logits: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    noise: _Noise | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``speculative_accept`` with its random numbers drawn beforehand (None: greedy)."""
    batch, num_drafts = drafts.shape
    if params.temperature == 0:
        target = target_logits.argmax(dim=-1)  # [B, K + 1]
        ok = drafts == target[:, :num_drafts]
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
        return accepted, target.gather(1, accepted[:, None]).squeeze(1)
    p = sampling_probs(target_logits, params)  # [B, K + 1, V]
    p_draft = p[:, :num_drafts].gather(-1, drafts[..., None]).squeeze(-1)  # [B, K]
    if num_drafts:
        q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        ok = noise.uniform * q_draft < p_draft  # accept with probability min(1, p / q)
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
        q = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)  # q_K = 0: p_K itself
    else:
        accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        q = torch.zeros_like(p)
    p_n, q_n = _at(p, accepted[:, None]).squeeze(1), _at(q, accepted[:, None]).squeeze(1)
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return accepted, _draw(residual, noise.residual)


@dataclass
class _Noise:
    """A round's random numbers, drawn in place before the round: a compiled round takes no
    generator. ``draw`` consumes the generator as eager sampling does (draft 1 .. K, the
    acceptance tests, the next token), so a seed gives the same tokens either way."""

    drafts: torch.Tensor  # [K_sampled, B, V] Exp(1): sampled drafts 1..K
    uniform: torch.Tensor  # [B, K] U(0, 1): the acceptance tests
    residual: torch.Tensor  # [B, V] Exp(1): the next token

    @staticmethod
    def empty(batch: int, sampled_drafts: int, tests: int, vocab: int, device) -> _Noise:
        def buffer(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=device)

        return _Noise(
            buffer(sampled_drafts, batch, vocab), buffer(batch, tests), buffer(batch, vocab)
        )

    def draw(self, generator: torch.Generator | None) -> None:
        for noise in self.drafts:
            noise.exponential_(1.0, generator=generator)
        if self.uniform.numel():
            self.uniform.uniform_(generator=generator)
        self.residual.exponential_(1.0, generator=generator)


# ---------------------------------------------------------------------------- the engine


def _log_progress(
    t0: float, generated: torch.Tensor, stopped: torch.Tensor, step: int, max_new: int
) -> None:
    elapsed = time.perf_counter() - t0
    tokens = int(generated.sum())
    logger.info(
        f"rollout: {tokens} tokens in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):.1f} tok/s), "
        f"{int((~stopped).sum())}/{stopped.numel()} rows running, step {step}, "
        f"max_new_tokens {max_new}"
    )


@dataclass
class _State:
    """Per-row decoding state, updated in place; B rows, L positions."""

    seq: torch.Tensor  # [B, L] token at each position: prompt, sampled tokens, then drafts
    fed: torch.Tensor  # [B] positions already in the trunk cache (the last sampled is not)
    generated: torch.Tensor  # [B] response tokens emitted
    stopped: torch.Tensor  # [B] bool: finished (a stop, or max_new_tokens)
    stop_hit: torch.Tensor  # [B] bool: finished by a stop token or string
    out_tokens: torch.Tensor  # [B, max_new + K + 1]: the last column is a write sink
    out_logp: torch.Tensor  # [B, max_new + K + 1]
    accepted_per_pos: torch.Tensor  # [K] drafts whose first j + 1 tokens were accepted
    drafts_made: torch.Tensor  # [] drafts verified
    texts: list[list[int]] | None  # response ids per row, kept for stop strings


class _CUDAGraphRound:
    """A round replayed as one CUDA graph. The first call runs it for real on a side stream
    (compiling and warming it up) and then records it; every later call replays the
    recording. Its inputs are one generation's buffers, updated in place, so a replay reads
    the current state; the graph and its memory pool go with the generation. (Captured
    here rather than by ``mode="reduce-overhead"``: its CUDA-graph trees treat buffers that
    are neither parameters nor static as inputs to copy, and skip graphs that mutate them.)
    """

    def __init__(self, round_fn: Callable):
        self.round_fn = round_fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    def __call__(self, *args):
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = self.round_fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.round_fn(*args)
        return outputs


class NativeRolloutEngine:
    """``RolloutEngine`` running batched KV-cache generation on the training model itself.

    Args:
        model: the ``MTPTransformer``: plain, FSDP2-sharded, TP-sharded or FSDP + TP.
        tokenizer: needed for ``stop_strings`` only (anything with ``decode(ids) -> str``).
        tp_group: the tensor-parallel group; found from the DTensor weights when None.
        speculative_tokens: K > 0 drafts K tokens per step with MTP modules 1..K and verifies
            them with one trunk forward (lossless); 0 decodes one token per trunk forward.
        progress_every_s: at most one progress log line per this many seconds.
        compile_decode: "none" (eager rounds), "compile" (``torch.compile``d rounds at
            fixed shapes) or "cudagraphs" (compiled rounds replayed as a CUDA graph; CUDA
            only); see the module docstring. Not under tensor parallelism.
        compile_backend: ``torch.compile``'s backend ("inductor"; tests pass "eager" or a
            counting backend to skip code generation).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer=None,
        tp_group: dist.ProcessGroup | None = None,
        speculative_tokens: int = 0,
        progress_every_s: float = 10.0,
        compile_decode: CompileMode = "none",
        compile_backend: str | Callable = "inductor",
    ):
        available = len(model.mtp)
        if not 0 <= speculative_tokens <= available:
            raise ValueError(
                f"speculative_tokens = {speculative_tokens}: the model has {available} MTP "
                f"module(s), and draft token k comes from module k, so it must be in "
                f"0..{available} ([rollout] speculative_tokens vs [mtp] num_modules)"
            )
        if compile_decode not in COMPILE_MODES:
            raise ValueError(
                f"compile_decode = {compile_decode!r}: one of {', '.join(COMPILE_MODES)}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.speculative_tokens = speculative_tokens
        self.decoder = Decoder(model.model_args, speculative_tokens, tp_group)
        self.progress_every_s = progress_every_s
        self.compile_decode = compile_decode
        self._compiled_round = None
        if compile_decode != "none":
            self._compiled_round = torch.compile(
                self._round, fullgraph=True, backend=compile_backend
            )
        self.last_spec_stats: SpecDecodeStats | None = None

    def sync_weights(self, version: int | None = None) -> None:
        """Nothing to push: the engine decodes with the training model's live weights."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.last_spec_stats = None
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need NativeRolloutEngine(tokenizer=...)")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {params.max_new_tokens} must be >= 1")
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        max_seq_len = self.model.rope_cache.shape[0]
        if longest > max_seq_len:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceed the model's "
                f"max_seq_len = {max_seq_len}"
            )
        if self.compile_decode == "cudagraphs" and self.model.rope_cache.device.type != "cuda":
            raise ValueError(
                'compile_decode = "cudagraphs" needs the model on a CUDA device; "compile" '
                "runs on CPU"
            )
        batch, prompt_width = len(prompts), max(len(p) for p in prompts)
        length = prompt_width + params.max_new_tokens + self.speculative_tokens
        with self.decoder.bound(self.model, batch, length) as decoder:
            if self.compile_decode != "none" and decoder.tp_group is not None:
                raise ValueError(
                    f"compile_decode = {self.compile_decode!r} under tensor parallelism: "
                    'not supported (the TP all-reduces are not traced); use "none"'
                )
            return self._generate(decoder, prompts, params, length)

    def _generate(
        self, dec: Decoder, prompts: list[list[int]], params: SamplingParams, length: int
    ) -> list[Completion]:
        device, dtype, (vocab, dim) = dec.embedding.device, dec.embedding.dtype, dec.embedding.shape
        num_drafts, max_new, group = self.speculative_tokens, params.max_new_tokens, dec.tp_group
        batch, prompt_width = len(prompts), max(len(p) for p in prompts)
        prompt_len = torch.tensor([len(p) for p in prompts], device=device)
        seq = torch.full((batch, length), PAD_ID, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            seq[row, : len(prompt)] = torch.tensor(prompt)
        state = _State(
            seq=seq.to(device),
            fed=prompt_len.clone(),
            generated=torch.zeros(batch, dtype=torch.long, device=device),
            stopped=torch.zeros(batch, dtype=torch.bool, device=device),
            stop_hit=torch.zeros(batch, dtype=torch.bool, device=device),
            out_tokens=torch.full((batch, max_new + num_drafts + 1), PAD_ID, device=device),
            out_logp=torch.zeros(batch, max_new + num_drafts + 1, device=device),
            accepted_per_pos=torch.zeros(num_drafts, dtype=torch.long, device=device),
            drafts_made=torch.zeros((), dtype=torch.long, device=device),
            texts=[[] for _ in prompts] if params.stop_strings else None,
        )
        generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        # Pre-norm hidden states by position: h^0 (trunk) .. h^{K-1}, inputs of modules 1..K.
        hidden = [
            torch.zeros(batch, length, dim, dtype=dtype, device=device) for _ in range(num_drafts)
        ]
        noise = None
        if params.temperature > 0:
            noise = _Noise.empty(batch, num_drafts, num_drafts, vocab, device)

        # Prefill: the whole right-padded prompt block; row b's next token from position
        # len_b - 1. Its padding positions are overwritten before anything attends to them.
        t0 = last_log = time.perf_counter()
        positions = torch.arange(prompt_width, device=device).expand(batch, -1)
        h, normed = dec.trunk(state.seq[:, :prompt_width], positions, prompt_width)
        logits = dec.logits(_at(normed, (prompt_len - 1)[:, None]))  # [B, 1, V]
        token = _broadcast(sample_tokens(logits, params, generator), group)
        count = self._emit(state, params, stop_ids, token, torch.zeros_like(prompt_len), logits)
        if state.texts is not None:
            self._stop_strings(state, params, token, count)
        _put(state.seq, prompt_len[:, None], token)
        # The first round's MTP modules run over the whole prompt and draft from its end.
        first_round = None
        if num_drafts:
            hidden[0][:, :prompt_width] = h
            first_round = (positions, prompt_len - 1)
        # Eager rounds attend over the longest row so far (read back every round); compiled
        # ones over the whole cache (end None), a fixed shape.
        compiled = self.compile_decode != "none"
        end, step = None, self._round
        if compiled:
            # One graph for every cache length L (it follows the prompts): L is symbolic.
            for buffer in (state.seq, *hidden):
                torch._dynamo.maybe_mark_dynamic(buffer, 1)
            dec.mark_length_dynamic()
            step = self._compiled_round
            if self.compile_decode == "cudagraphs":
                step = _CUDAGraphRound(step)
        # Compiled on a GPU, the host does not wait for a round before queueing the next:
        # it reads the running rows of round r - 1 (copied asynchronously) once round r is
        # queued, so a finished batch runs one idle round. On CPU, reading them is free.
        lagged = compiled and device.type == "cuda"
        previous = None  # lagged: (event, running rows) of the round before
        # Every running row emits at least one token per round.
        rounds = 0
        for rounds in range(1, max_new):
            if not lagged or rounds == 1:
                alive, longest = torch.stack([(~state.stopped).sum(), state.fed.max()]).tolist()
                if not alive:
                    break
                end = None if compiled else longest
            if time.perf_counter() - last_log >= self.progress_every_s:
                last_log = time.perf_counter()
                _log_progress(t0, state.generated, state.stopped, rounds, max_new)
            if noise is not None:
                noise.draw(generator)
            if first_round is not None:
                candidates, count = self._round(
                    dec, state, hidden, noise, params, stop_ids, end, *first_round
                )
                first_round = None
            else:
                candidates, count = step(dec, state, hidden, noise, params, stop_ids, end)
            if state.texts is not None:
                self._stop_strings(state, params, candidates, count)
            if lagged:
                running = (~state.stopped).sum().to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                if previous is not None:
                    previous[0].synchronize()
                    if not previous[1]:  # every row had finished: this round was idle
                        break
                previous = (event, running)
        if time.perf_counter() - t0 >= self.progress_every_s:  # a summary of long rollouts
            _log_progress(t0, state.generated, state.stopped, rounds, max_new)
        if num_drafts:
            made = int(state.drafts_made)
            self.last_spec_stats = SpecDecodeStats(
                made, made * num_drafts, state.accepted_per_pos.cpu().tolist()
            )
        return self._completions(prompts, state)

    def _round(
        self,
        dec: Decoder,
        state: _State,
        hidden: list[torch.Tensor],
        noise: _Noise | None,
        params: SamplingParams,
        stop_ids: torch.Tensor,
        end: int | None,
        window: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One round, in place on ``state``, ``hidden`` and the caches: K drafts, one trunk
        forward over [last token, d_1 .. d_K], the accepted tokens emitted.

        ``end``: cache positions attended to by the drafts (the verification: end + K + 1);
        None: the whole cache (L - K - 1, L: every round has the same shapes).
        ``window`` [B, W] and ``query`` [B]: where the MTP modules run and draft from in the
        first round (see ``_draft``); None: the last 2K positions and the last one.
        Returns the candidates [B, K + 1] and the tokens emitted per row [B] (stop strings).
        """
        num_drafts, device = self.speculative_tokens, state.seq.device
        if end is None:
            end = state.seq.shape[1] - num_drafts - 1
        running = ~state.stopped
        if num_drafts:
            if window is None:  # module k recomputes its last K + k positions: window of 2K
                offsets = torch.arange(2 * num_drafts, device=device)
                window = (state.fed[:, None] - 2 * num_drafts + offsets).clamp(min=0)
            drafts, draft_probs = self._draft(dec, state, hidden, window, query, end, params, noise)
        else:
            drafts, draft_probs = state.seq.new_zeros(state.seq.shape[0], 0), None
        # Verify: the last sampled token and the drafts, in one trunk forward.
        positions = state.fed[:, None] + torch.arange(num_drafts + 1, device=device)
        h, normed = dec.trunk(_at(state.seq, positions), positions, end + num_drafts + 1)
        logits = dec.logits(normed)  # [B, K + 1, V]
        accepted, token = _accept(logits, drafts, draft_probs, params, noise)
        accepted, token = _broadcast(torch.stack([accepted, token]), dec.tp_group)
        if num_drafts:
            _put(hidden[0], positions, h)
            hits = torch.arange(num_drafts, device=device)[None, :] < accepted[:, None]
            state.accepted_per_pos += (hits & running[:, None]).sum(dim=0)
            state.drafts_made += running.sum()
        # [d_1 .. d_accepted, token, ...]: the row's new tokens are entries 0..accepted.
        candidates = torch.cat([drafts, token[:, None]], dim=1)
        candidates.scatter_(1, accepted[:, None], token[:, None])
        count = self._emit(state, params, stop_ids, candidates, accepted, logits)
        _put(state.seq, (state.fed + accepted + 1)[:, None], token[:, None])
        state.fed.copy_(torch.where(state.stopped, state.fed, state.fed + accepted + 1))
        return candidates, count

    def _draft(
        self,
        dec: Decoder,
        state: _State,
        hidden: list[torch.Tensor],
        window: torch.Tensor,
        query: torch.Tensor | None,
        end: int,
        params: SamplingParams,
        noise: _Noise | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K chained drafts [B, K] and the distributions they were sampled from [B, K, V].

        Module k runs at the positions ``window`` [B, W] (its last K + k columns after the
        prefill) and drafts from position ``query`` [B] (the last column when None).
        Drafts are written into ``state.seq`` after the last sampled token.
        """
        num_drafts = self.speculative_tokens
        drafts, probs = [], []
        for k in range(1, num_drafts + 1):
            positions = window if query is not None else window[:, num_drafts - k :]
            h, normed = dec.mtp(
                k,
                _at(hidden[k - 1], positions),
                _at(state.seq, positions + k),  # token i + k: committed, or drafts 1..k-1
                positions,
                end,
            )
            if k < num_drafts:
                _put(hidden[k], positions, h)
            if query is None:
                logits = dec.logits(normed[:, -1])  # [B, V]
            else:
                logits = dec.logits(_at(normed, query[:, None]).squeeze(1))
            if params.temperature == 0:
                draft = logits.argmax(dim=-1)
            else:
                probs.append(sampling_probs(logits, params))
                draft = _draw(probs[-1], noise.drafts[k - 1])
            draft = _broadcast(draft, dec.tp_group)
            _put(state.seq, (state.fed + k)[:, None], draft[:, None])
            drafts.append(draft)
        return torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None

    def _emit(
        self,
        state: _State,
        params: SamplingParams,
        stop_ids: torch.Tensor,
        candidates: torch.Tensor,
        accepted: torch.Tensor,
        logits: torch.Tensor,
    ) -> torch.Tensor:
        """Append candidates [B, T] (entries 0..accepted[b] are the row's new tokens) to the
        running rows' responses, within max_new_tokens and up to a stop token; logits
        [B, T, V] give their behaviour log-probs. Returns the tokens appended per row [B]."""
        max_new = params.max_new_tokens
        running = ~state.stopped
        j = torch.arange(candidates.shape[1], device=candidates.device)[None, :]
        ok = (j <= accepted[:, None]) & (state.generated[:, None] + j < max_new) & running[:, None]
        is_stop = torch.isin(candidates, stop_ids) & ok
        ok &= (is_stop.long().cumsum(dim=1) - is_stop.long()) == 0  # nothing after a stop
        # The behaviour policy's own log-prob (temperature 1, no filtering).
        logp = logits.gather(-1, candidates[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)
        sink = state.out_tokens.shape[1] - 1
        index = torch.where(ok, state.generated[:, None] + j, sink)
        state.out_tokens.scatter_(1, index, candidates)
        state.out_logp.scatter_(1, index, logp)
        count = ok.sum(dim=1)
        state.generated += count
        state.stop_hit |= is_stop.any(dim=1)
        state.stopped |= running & (is_stop.any(dim=1) | (state.generated >= max_new))
        return count

    def _stop_strings(
        self, state: _State, params: SamplingParams, candidates: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Stop rows whose decoded response now contains a stop string, right after it (on
        the host: a sync per round)."""
        counts = count.cpu().tolist()
        rows = [row for row, n in enumerate(counts) if n]
        if not rows:
            return
        new = candidates.cpu().tolist()
        first = (state.generated - count).cpu().tolist()
        for row in rows:
            for j in range(counts[row]):
                state.texts[row].append(new[row][j])
                text = self.tokenizer.decode(state.texts[row])
                if any(s in text for s in params.stop_strings):
                    state.generated[row] = first[row] + j + 1
                    state.stopped[row] = state.stop_hit[row] = True
                    break

    @staticmethod
    def _completions(prompts: list[list[int]], state: _State) -> list[Completion]:
        tokens, logps = state.out_tokens.cpu().tolist(), state.out_logp.cpu().tolist()
        lengths, stop_hit = state.generated.cpu().tolist(), state.stop_hit.cpu().tolist()
        return [
            Completion(
                prompt_ids=list(prompt),
                token_ids=tokens[row][: lengths[row]],
                logprobs=logps[row][: lengths[row]],
                finish_reason="stop" if stop_hit[row] else "length",
            )
            for row, prompt in enumerate(prompts)
        ]
