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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchtitan.tools.logging import logger

from ..models.decode import Decoder
from .base import Completion, SamplingParams, SpecDecodeStats

__all__ = ["NativeRolloutEngine", "sample_tokens", "sampling_probs", "speculative_accept"]

PAD_ID = 0
"""Token fed in padding columns and after a row finished; never attended to or returned."""


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


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample [...] of each distribution [..., V] (unnormalised is fine), without a host
    sync: argmax(p / E), E ~ Exp(1)."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample tokens [...] from raw float32 logits [..., V] with temperature, top-k, top-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return _draw(sampling_probs(logits, params), generator)


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
        u = torch.rand(batch, num_drafts, device=p.device, generator=generator)
        ok = u * q_draft < p_draft  # accept with probability min(1, p / q)
        accepted = ok.long().cumprod(dim=1).sum(dim=1)
        q = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)  # q_K = 0: p_K itself
    else:
        accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        q = torch.zeros_like(p)
    p_n, q_n = _at(p, accepted[:, None]).squeeze(1), _at(q, accepted[:, None]).squeeze(1)
    residual = (p_n - q_n).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return accepted, _draw(residual, generator)


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
    """Per-row decoding state; B rows, L positions."""

    seq: torch.Tensor  # [B, L] token at each position: prompt, sampled tokens, then drafts
    fed: torch.Tensor  # [B] positions already in the trunk cache (the last sampled is not)
    generated: torch.Tensor  # [B] response tokens emitted
    stopped: torch.Tensor  # [B] bool: finished (a stop, or max_new_tokens)
    stop_hit: torch.Tensor  # [B] bool: finished by a stop token or string
    out_tokens: torch.Tensor  # [B, max_new + K + 1]: the last column is a write sink
    out_logp: torch.Tensor  # [B, max_new + K + 1]
    texts: list[list[int]] | None  # response ids per row, kept for stop strings


class NativeRolloutEngine:
    """``RolloutEngine`` running batched KV-cache generation on the training model itself.

    Args:
        model: the ``MTPTransformer``: plain, FSDP2-sharded, TP-sharded or FSDP + TP.
        tokenizer: needed for ``stop_strings`` only (anything with ``decode(ids) -> str``).
        tp_group: the tensor-parallel group; found from the DTensor weights when None.
        speculative_tokens: K > 0 drafts K tokens per step with MTP modules 1..K and verifies
            them with one trunk forward (lossless); 0 decodes one token per trunk forward.
        progress_every_s: at most one progress log line per this many seconds.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer=None,
        tp_group: dist.ProcessGroup | None = None,
        speculative_tokens: int = 0,
        progress_every_s: float = 10.0,
    ):
        available = len(model.mtp)
        if not 0 <= speculative_tokens <= available:
            raise ValueError(
                f"speculative_tokens = {speculative_tokens}: the model has {available} MTP "
                f"module(s), and draft token k comes from module k, so it must be in "
                f"0..{available} ([rollout] speculative_tokens vs [mtp] num_modules)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.speculative_tokens = speculative_tokens
        self.decoder = Decoder(model.model_args, speculative_tokens, tp_group)
        self.progress_every_s = progress_every_s
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
        batch, prompt_width = len(prompts), max(len(p) for p in prompts)
        length = prompt_width + params.max_new_tokens + self.speculative_tokens
        with self.decoder.bound(self.model, batch, length) as decoder:
            return self._generate(decoder, prompts, params, length)

    def _generate(
        self, dec: Decoder, prompts: list[list[int]], params: SamplingParams, length: int
    ) -> list[Completion]:
        device, dtype, dim = dec.embedding.device, dec.embedding.dtype, dec.embedding.shape[1]
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
            texts=[[] for _ in prompts] if params.stop_strings else None,
        )
        generator = torch.Generator(device=device).manual_seed(params.seed)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        # Pre-norm hidden states by position: h^0 (trunk) .. h^{K-1}, inputs of modules 1..K.
        hidden = [
            torch.zeros(batch, length, dim, dtype=dtype, device=device) for _ in range(num_drafts)
        ]
        accepted_per_pos = torch.zeros(num_drafts, dtype=torch.long, device=device)
        drafts_made = torch.zeros((), dtype=torch.long, device=device)

        # Prefill: the whole right-padded prompt block; row b's next token from position
        # len_b - 1. Its padding positions are overwritten before anything attends to them.
        t0 = last_log = time.perf_counter()
        positions = torch.arange(prompt_width, device=device).expand(batch, -1)
        h, normed = dec.trunk(state.seq[:, :prompt_width], positions, prompt_width)
        logits = dec.logits(_at(normed, (prompt_len - 1)[:, None]))  # [B, 1, V]
        token = _broadcast(sample_tokens(logits, params, generator), group)
        self._emit(state, params, stop_ids, token, torch.zeros_like(prompt_len), logits)
        _put(state.seq, prompt_len[:, None], token)
        if num_drafts:
            hidden[0][:, :prompt_width] = h
            window, query = positions, prompt_len - 1
        rounds = 1
        while True:
            alive, end = torch.stack([(~state.stopped).sum(), state.fed.max()]).tolist()
            if not alive:
                break
            if time.perf_counter() - last_log >= self.progress_every_s:
                last_log = time.perf_counter()
                _log_progress(t0, state.generated, state.stopped, rounds, max_new)
            running = ~state.stopped
            if num_drafts:
                drafts, draft_probs = self._draft(
                    dec, state, hidden, window, query, end, params, generator
                )
            else:
                drafts, draft_probs = state.seq.new_zeros(batch, 0), None
            # Verify: the last sampled token and the drafts, in one trunk forward.
            positions = state.fed[:, None] + torch.arange(num_drafts + 1, device=device)
            h, normed = dec.trunk(_at(state.seq, positions), positions, end + num_drafts + 1)
            logits = dec.logits(normed)  # [B, K + 1, V]
            accepted, token = speculative_accept(logits, drafts, draft_probs, params, generator)
            accepted, token = _broadcast(torch.stack([accepted, token]), group)
            if num_drafts:
                _put(hidden[0], positions, h)
                hits = torch.arange(num_drafts, device=device)[None, :] < accepted[:, None]
                accepted_per_pos += (hits & running[:, None]).sum(dim=0)
                drafts_made += running.sum()
            # [d_1 .. d_accepted, token, ...]: the row's new tokens are entries 0..accepted.
            candidates = torch.cat([drafts, token[:, None]], dim=1)
            candidates.scatter_(1, accepted[:, None], token[:, None])
            self._emit(state, params, stop_ids, candidates, accepted, logits)
            _put(state.seq, (state.fed + accepted + 1)[:, None], token[:, None])
            state.fed = torch.where(state.stopped, state.fed, state.fed + accepted + 1)
            if num_drafts:  # module k recomputes its last K + k positions: window of 2K
                window = (
                    state.fed[:, None]
                    - 2 * num_drafts
                    + torch.arange(2 * num_drafts, device=device)
                ).clamp(min=0)
                query = None
            rounds += 1
        if time.perf_counter() - t0 >= self.progress_every_s:  # a summary of long rollouts
            _log_progress(t0, state.generated, state.stopped, rounds, max_new)
        if num_drafts:
            made = int(drafts_made)
            self.last_spec_stats = SpecDecodeStats(
                made, made * num_drafts, accepted_per_pos.cpu().tolist()
            )
        return self._completions(prompts, state)

    def _draft(
        self,
        dec: Decoder,
        state: _State,
        hidden: list[torch.Tensor],
        window: torch.Tensor,
        query: torch.Tensor | None,
        end: int,
        params: SamplingParams,
        generator: torch.Generator,
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
            last = query if query is not None else torch.full_like(state.fed, h.shape[1] - 1)
            logits = dec.logits(_at(normed, last[:, None]).squeeze(1))  # [B, V]
            if params.temperature == 0:
                draft = logits.argmax(dim=-1)
            else:
                probs.append(sampling_probs(logits, params))
                draft = _draw(probs[-1], generator)
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
    ) -> None:
        """Append candidates [B, T] (entries 0..accepted[b] are the row's new tokens) to the
        running rows' responses, within max_new_tokens and up to a stop; logits [B, T, V]
        give their behaviour log-probs."""
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
        if state.texts is not None:
            self._stop_strings(state, params, candidates, count)

    def _stop_strings(
        self, state: _State, params: SamplingParams, candidates: torch.Tensor, count: torch.Tensor
    ) -> None:
        """Stop rows whose decoded response now contains a stop string, right after it."""
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
