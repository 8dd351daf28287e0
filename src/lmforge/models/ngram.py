"""Statistical n-gram language models, counted and scored with numpy (no per-n-gram Python objects).

    p(w | h) = u(w | h) + b(h) * p(w | h')        h' = h without its first word (interpolation)

Every smoothing method here is an *interpolated* model of that form, which is also exactly an ARPA backoff
model: an n-gram seen in training stores p(w | h), a context stores its backoff weight b(h), and an unseen
n-gram is scored as b(h) * p(w | h'). With c(.) raw counts, a(.) adjusted counts, D(h) = sum_x c(h x),
T(h) = |{x : c(h x) > 0}|, and V the vocabulary without <s>:

* ``mle``                  u = c(hw) / D(h),  b = 0: unseen events get probability zero (reported).
* ``add-k``                u = c(hw) / (D(h) + kV),  b = kV / (D(h) + kV): k pseudo-counts per word, spread
                           by the lower order (for unigrams: uniformly, i.e. classic Laplace (c+k)/(N+kV)).
* ``witten-bell``          u = c(hw) / (D(h) + T(h)),  b = T(h) / (D(h) + T(h))  (interpolated).
* ``kneser-ney``           u = max(a(hw) - D, 0) / sum_x a(h x),  b = D * N1+(h.) / sum_x a(h x),
                           one discount per order D = t1 / (t1 + 2 t2).
* ``modified-kneser-ney``  Chen & Goodman (1998), as KenLM's lmplz estimates it: three discounts per order
                           from the counts-of-counts t_k of adjusted counts, Y = t1 / (t1 + 2 t2),
                           D_k = k - (k + 1) Y t_{k+1} / t_k  (k = 1, 2, 3+);
                           u = (a(hw) - D(a(hw))) / sum_x a(h x),
                           b = (D1 N1(h.) + D2 N2(h.) + D3 N3+(h.)) / sum_x a(h x).

Adjusted counts (Kneser-Ney): for the highest order, and n-grams that start with <s>, the raw count;
otherwise the number of distinct words seen to its left, a(w_1^n) = |{v : c(v w_1^n) > 0}|. Unigrams
interpolate with the uniform distribution over V (so <unk> gets b(empty)/|V|); p(<s>) = 0.

Sentences follow KenLM: ``<s> w1 .. wk </s>``; <s> is only a context, </s> is predicted. In an lmforge
token stream the end-of-text token (``</s>`` for word data, ``<|endoftext|>`` otherwise) ends a
sentence/document and a virtual <s> starts the next one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..errors import LMForgeError
from ..options import Options, option
from ..tokenizers import check_tokenizer_fits, load_tokenizer
from ..utils import atomic_write, atomic_write_json, read_json
from .base import LanguageModel, Trace

Smoothing = Literal["mle", "add-k", "witten-bell", "kneser-ney", "modified-kneser-ney"]
SMOOTHINGS: tuple[str, ...] = get_args(Smoothing)
MAX_ORDER = 64


@dataclass
class NGramConfig(Options):
    """How an n-gram model is counted and smoothed (``lmforge train --model ngram``)."""

    order: int = option(3, ge=1, le=MAX_ORDER, help="n-gram order")
    smoothing: Smoothing = option("modified-kneser-ney", help="smoothing of the counts")
    add_k: float = option(1.0, gt=0, le=1e6, help="k for add-k smoothing (1 = Laplace)")
    discount_fallback: bool = option(False, help="use discounts 0.5 1 1.5 when they cannot be estimated "
                                     "(KenLM's --discount_fallback)")
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults
NEG_INF = float("-inf")


def _insert_bos(stream: np.ndarray, eos: int, bos: int) -> np.ndarray:
    """<s> before the stream and after every </s> (except a trailing one)."""
    stream = np.asarray(stream, dtype=np.int64)
    ends = np.flatnonzero(stream[:-1] == eos) + 1
    return np.insert(np.concatenate([[bos], stream]), ends + 1, bos)


def modified_kn_discounts(a: np.ndarray, order: int, fallback: bool) -> tuple[float, float, float]:
    t = [int(np.count_nonzero(a == k)) for k in (1, 2, 3, 4)]
    try:
        y = t[0] / (t[0] + 2 * t[1])
        d = tuple(k - (k + 1) * y * t[k] / t[k - 1] for k in (1, 2, 3))
        if all(0 < d[k - 1] < k for k in (1, 2, 3)):
            return d  # type: ignore[return-value]
    except ZeroDivisionError:
        pass
    if not fallback:
        raise LMForgeError(f"order {order}: discounts cannot be estimated from counts-of-counts {t[:4]} "
                           "(too little data); pass --discount-fallback")
    warnings.warn(f"order {order}: counts-of-counts {t} give no valid discounts; falling back to "
                  f"{FALLBACK_DISCOUNTS} (KenLM's --discount_fallback)", stacklevel=2)
    return FALLBACK_DISCOUNTS


class NGramModel(LanguageModel):
    """An n-gram model held as sorted integer keys per order (key = context_id * V + word)."""

    model_type = "ngram"
    has_backoff = True

    def __init__(self, order: int, vocab: int, bos: int, eos: int, unk: int | None,
                 keys: list[np.ndarray], logp: list[np.ndarray], logbo: list[np.ndarray],
                 meta: dict[str, Any] | None = None) -> None:
        self.order, self.V, self.bos, self.eos, self.unk = order, vocab, bos, eos, unk
        # index n-1 holds order n: keys (sorted int64), natural-log probability, natural-log backoff
        self.keys, self.logp, self.logbo = keys, logp, logbo
        self.meta = meta or {}
        self.tokenizer = None

    # --- estimation ----------------------------------------------------------------------------
    @classmethod
    def train(cls, stream: np.ndarray, order: int, vocab_size: int, eos: int, bos: int | None = None,
              unk: int | None = None, smoothing: str = "modified-kneser-ney", k: float = 1.0,
              discount_fallback: bool = False) -> NGramModel:
        """Count and smooth. ``vocab_size`` is the tokenizer's; a virtual <s> id is added when ``bos`` is None."""
        if order < 1:
            raise LMForgeError(f"n-gram order must be at least 1, got {order}")
        if smoothing not in SMOOTHINGS:
            raise LMForgeError(f"unknown smoothing {smoothing!r}; choose one of {', '.join(SMOOTHINGS)}")
        stream = np.asarray(stream, dtype=np.int64)
        if len(stream) == 0:
            raise LMForgeError("no training text: the training split is empty")
        V = vocab_size + (1 if bos is None else 0)
        bos = vocab_size if bos is None else bos
        S = _insert_bos(stream, eos, bos)
        P = len(S)
        kn = smoothing in ("kneser-ney", "modified-kneser-ney")
        # ids[n][i]: id of the n-gram S[i:i+n] among the unique n-grams of order n (-1: not an n-gram)
        ids = [S.copy()]
        keys = [np.arange(V, dtype=np.int64)]  # every word is a unigram (p > 0 even if unseen)
        first: list[np.ndarray] = [np.arange(V)]  # a position where each n-gram occurs (unigrams: unused)
        for n in range(2, order + 1):
            prev = ids[-1]
            key = np.full(P, -1, dtype=np.int64)
            i = np.arange(P - n + 1)
            w = S[n - 1:]
            ok = (prev[:P - n + 1] >= 0) & (S[n - 2:P - 1] != eos) & (w != bos)
            key[i[ok]] = prev[i[ok]] * V + w[ok]
            valid = key >= 0
            uniq, first_idx, inv = np.unique(key[valid], return_index=True, return_inverse=True)
            cur = np.full(P, -1, dtype=np.int64)
            cur[valid] = inv
            ids.append(cur)
            keys.append(uniq)
            first.append(np.flatnonzero(valid)[first_idx])
        counts = [np.bincount(ids[n][ids[n] >= 0], minlength=len(keys[n])).astype(np.float64)
                  for n in range(order)]
        # adjusted counts for Kneser-Ney (continuation counts), see the module docstring
        adj = [c.copy() for c in counts]
        if kn:
            for n in range(order - 1):  # order n+1 here
                suffix = ids[n][first[n + 1] + 1]  # the n-gram after dropping the first word
                cont = np.bincount(suffix, minlength=len(keys[n])).astype(np.float64)
                starts_bos = (S[first[n]] == bos) if n > 0 else (np.arange(V) == bos)
                adj[n] = np.where(starts_bos, counts[n], cont)
        vocab_u = V - 1  # the uniform distribution covers every word but <s>
        logp: list[np.ndarray] = []
        logbo: list[np.ndarray] = []
        discounts: list[list[float]] = []
        prob_lower: np.ndarray | None = None
        for n in range(order):
            a = adj[n] if kn else counts[n]
            if n == 0:
                a = a.copy()
                a[bos] = 0.0
                ctx = np.zeros(len(a), dtype=np.int64)
                n_ctx = 1
            else:
                ctx = keys[n] // V
                n_ctx = len(keys[n - 1])
            denom = np.bincount(ctx, weights=a, minlength=n_ctx)
            if smoothing == "modified-kneser-ney":
                d = modified_kn_discounts(a[a > 0], n + 1, discount_fallback)
                discounts.append(list(d))
                dk = np.select([a == 0, a == 1, a == 2], [0.0, d[0], d[1]], d[2])
                u_num = a - dk
                b_num = np.bincount(ctx, weights=dk * (a > 0), minlength=n_ctx)
            elif smoothing == "kneser-ney":
                t1, t2 = np.count_nonzero(a == 1), np.count_nonzero(a == 2)
                d1 = t1 / (t1 + 2 * t2) if t1 + 2 * t2 > 0 else 0.0
                if not 0 < d1 < 1:
                    if not discount_fallback:
                        raise LMForgeError(f"order {n + 1}: the discount cannot be estimated (t1={t1}, t2={t2}); "
                                           "pass --discount-fallback")
                    warnings.warn(f"order {n + 1}: no valid discount; falling back to 0.5", stacklevel=2)
                    d1 = 0.5
                discounts.append([d1])
                u_num = np.maximum(a - d1, 0.0)
                b_num = np.bincount(ctx, weights=np.minimum(a, d1) * (a > 0), minlength=n_ctx)
            elif smoothing == "witten-bell":
                u_num = a
                b_num = np.bincount(ctx, weights=(a > 0).astype(np.float64), minlength=n_ctx)
                denom = denom + b_num
            elif smoothing == "add-k":
                u_num = a
                b_num = np.full(n_ctx, k * vocab_u, dtype=np.float64)
                denom = denom + b_num
            else:  # mle
                u_num = a
                b_num = np.zeros(n_ctx)
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.where(denom[ctx] > 0, u_num / np.where(denom[ctx] > 0, denom[ctx], 1), 0.0)
                b = np.where(denom > 0, b_num / np.where(denom > 0, denom, 1), 1.0)
            if n == 0:
                p = u + b[0] / vocab_u
                p[bos] = 0.0
            else:
                suffix = ids[n - 1][first[n] + 1]
                p = u + b[ctx] * prob_lower[suffix]
                with np.errstate(divide="ignore"):
                    logbo[n - 1] = np.log(np.where(denom > 0, b, 1.0))
            with np.errstate(divide="ignore"):
                logp.append(np.log(p))
            logbo.append(np.zeros(len(keys[n])))
            prob_lower = p
        meta = {"smoothing": smoothing, "discounts": discounts, "k": k,
                "counts": [int(len(keys[0]))] + [int(len(x)) for x in keys[1:]],
                "train_tokens": int(len(stream))}
        return cls(order, V, bos, eos, unk, keys, logp, logbo, meta)

    # --- scoring -------------------------------------------------------------------------------
    def _find(self, n: int, key: np.ndarray) -> np.ndarray:
        """Index of each key in order n's table, or -1."""
        tab = self.keys[n - 1]
        if n == 1:
            return np.where((key >= 0) & (key < self.V), key, -1)
        pos = np.searchsorted(tab, key)
        pos = np.minimum(pos, len(tab) - 1)
        return np.where((key >= 0) & (tab[pos] == key), pos, -1)

    def score_stream(self, z: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Natural-log p(targets[t] | z[..H+t]) where ``z`` is the history (order-1 tokens) followed by one
        context token per target, H = order - 1. Returns (log-probabilities, matched n-gram lengths).

        Vectorised over positions: L[m][j] is the id of the length-m n-gram ending at z[j] (or -1), built
        as L[m][j] = id(L[m-1][j-1] * V + z[j]); each target then takes its longest matching n-gram and
        adds the backoff weights of the longer contexts it backed off from (ARPA semantics)."""
        N, V = self.order, self.V
        z = np.where(z == self.eos, self.bos, z)  # after </s> the context is <s>
        H, T = N - 1, len(targets)
        L: list[np.ndarray] = [np.empty(0), self._find(1, z)] if N > 1 else [np.empty(0)]
        for m in range(2, N):
            key = np.full(len(z), -1, dtype=np.int64)
            prev = L[m - 1][:-1]
            key[1:] = np.where(prev >= 0, prev * V + z[1:], -1)
            L.append(self._find(m, key))
        out = np.full(T, NEG_INF)
        matched = np.zeros(T, dtype=np.int64)
        found = np.zeros(T, dtype=bool)
        bo_sum = np.zeros(T)
        for m in range(N - 1, -1, -1):  # the longest context first
            if m == 0:
                idx = self._find(1, targets)
            else:
                c = L[m][H:H + T]
                idx = self._find(m + 1, np.where(c >= 0, c * V + targets, -1))
            hit = (idx >= 0) & ~found
            out[hit] = self.logp[m][idx[hit]] + bo_sum[hit]
            matched[hit] = m + 1
            found |= hit
            if m > 0:  # backing off past an existing context costs its backoff weight
                c = L[m][H:H + T]
                has = (c >= 0) & ~found
                bo_sum[has] += self.logbo[m - 1][c[has]]
        return out, matched

    def ngram_id(self, tokens: list[int]) -> int:
        """Id of an n-gram in its order's table, or -1."""
        cur = -1
        for j, w in enumerate(tokens):
            key = np.array([w if j == 0 else (cur * self.V + w if cur >= 0 else -1)])
            cur = int(self._find(j + 1, key)[0])
            if cur < 0:
                return -1
        return cur

    # --- LanguageModel protocol ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.V if self.tokenizer is None else self.tokenizer.vocab_size

    @property
    def context_length(self) -> None:
        return None

    def init_state(self, batch_size: int, max_length: int = 0) -> torch.Tensor:
        """The history: the last order-1 tokens of each row, starting as <s> (i.e. a new sentence)."""
        return torch.full((batch_size, max(self.order - 1, 0)), self.bos, dtype=torch.long)

    def _history(self, state: torch.Tensor | None, B: int) -> np.ndarray:
        return (self.init_state(B) if state is None else state).numpy()

    def score(self, input_ids: torch.Tensor, targets: torch.Tensor, state: Any = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = input_ids.shape
        hist = self._history(state, B)
        z = np.concatenate([hist, input_ids.numpy().astype(np.int64)], axis=1)
        y = targets.numpy().astype(np.int64)
        out = np.stack([self.score_stream(z[b], y[b])[0] for b in range(B)])
        H = self.order - 1
        return torch.from_numpy(out), torch.from_numpy(z[:, z.shape[1] - H:]) if H else self.init_state(B)

    def distribution(self, context: list[int]) -> np.ndarray:
        """log p(. | context) over the whole vocabulary (the last order-1 tokens are used)."""
        ctx = [self.bos if c == self.eos else c for c in context][-(self.order - 1):] if self.order > 1 else []
        # cut at the last <s>: nothing before it is context
        if self.bos in ctx:
            ctx = ctx[len(ctx) - 1 - ctx[::-1].index(self.bos):]
        dist = np.exp(self.logp[0][: self.V])
        ids: list[int] = []
        for m in range(1, len(ctx) + 1):  # contexts of growing length, ending at the last token
            cid = self.ngram_id(ctx[-m:])
            if cid < 0:
                break
            ids.append(cid)
        for m, cid in enumerate(ids, start=1):
            dist = dist * math.exp(self.logbo[m - 1][cid])
            lo, hi = np.searchsorted(self.keys[m], [cid * self.V, (cid + 1) * self.V])
            words = self.keys[m][lo:hi] - cid * self.V
            dist[words] = np.exp(self.logp[m][lo:hi])
        with np.errstate(divide="ignore"):
            return np.log(dist)

    def forward_logits(self, input_ids: torch.Tensor, state: Any = None,
                       last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = input_ids.shape
        hist = self._history(state, B)
        full = np.concatenate([hist, input_ids.numpy()], axis=1)
        H = self.order - 1
        V = self.vocab_size
        positions = [T - 1] if last_only else range(T)
        out = np.empty((B, len(positions), V))
        for b in range(B):
            for i, t in enumerate(positions):
                out[b, i] = self.distribution(full[b, : H + t + 1].tolist())[:V]
        new_state = torch.from_numpy(full[:, full.shape[1] - H:]) if H else self.init_state(B)
        return torch.from_numpy(out).float(), new_state

    def trace(self, input_ids: torch.Tensor, targets: torch.Tensor, state: Any = None,
              source_ids: torch.Tensor | None = None) -> tuple[Trace, torch.Tensor]:
        """The full distributions, and the order of the longest n-gram found for each target (its back-off)."""
        logits, new_state = self.forward_logits(input_ids[:1], state)
        z = np.concatenate([self._history(state, 1)[0], input_ids[0].numpy().astype(np.int64)])
        _, order = self.score_stream(z, targets[0].numpy().astype(np.int64))
        return Trace(logits[0], backoff_order=order), new_state

    def state_select(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, index)

    def num_parameters(self) -> int:
        return int(sum(len(k) for k in self.keys[1:]) + len(self.keys[0]))

    # --- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, save_tokenizer: bool = True) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for n in range(self.order):
            tensors[f"keys.{n + 1}"] = self.keys[n]
            tensors[f"logp.{n + 1}"] = self.logp[n]
            tensors[f"logbo.{n + 1}"] = self.logbo[n]
        atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp))
        atomic_write_json(directory / "config.json", {
            "model_type": "ngram", "order": self.order, "vocab": self.V, "bos": self.bos, "eos": self.eos,
            "unk": self.unk, **self.meta})
        if save_tokenizer and self.tokenizer is not None:
            self.tokenizer.save(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> NGramModel:
        directory = Path(directory)
        cfg = read_json(directory / "config.json", "model config")
        where = directory / "config.json"

        def whole(key: str, low: int, high: float = math.inf, optional: bool = False) -> int | None:
            v = cfg.get(key)
            if v is None and optional:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v < high:
                raise LMForgeError(f"{where} is damaged: {key} must be a whole number in [{low}, {high}), not "
                                   f"{str(v)[:40]!r}")
            return v

        if not isinstance(cfg, dict):
            raise LMForgeError(f"{where} must be a JSON object of settings")
        N, V = whole("order", 1, 64), whole("vocab", 2)
        bos, eos, unk = whole("bos", 0, V), whole("eos", 0, V), whole("unk", 0, V, optional=True)
        path = directory / "model.safetensors"
        if not path.exists():
            raise LMForgeError(f"n-gram tables {path} are missing; the run directory is incomplete")
        try:
            t = load_file(str(path))
            keys = [t[f"keys.{n}"] for n in range(1, N + 1)]
            logp = [t[f"logp.{n}"] for n in range(1, N + 1)]
            logbo = [t[f"logbo.{n}"] for n in range(1, N + 1)]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise LMForgeError(f"n-gram tables {path} are truncated or corrupted ({str(e)[:80]})") from None
        check_tables(keys, logp, logbo, V, str(path))
        meta = {k: v for k, v in cfg.items() if k not in ("model_type", "order", "vocab", "bos", "eos", "unk")}
        model = cls(N, V, bos, eos, unk, keys, logp, logbo, meta)  # type: ignore[arg-type]
        if (directory / "tokenizer.json").exists():
            model.tokenizer = load_tokenizer(directory)
            check_tokenizer_fits(model.tokenizer, V, str(directory))
        return model


def check_tables(keys: list[np.ndarray], logp: list[np.ndarray], logbo: list[np.ndarray], V: int,
                 where: str) -> None:
    """The invariants scoring relies on (a damaged file would index out of bounds or score silently wrong):
    per order, three 1-D tables of one length; unigram keys are 0..V-1; higher orders' keys are sorted,
    unique, and their context is an entry of the order below; probabilities are log-probabilities
    (<= 0, -inf allowed) and backoffs are not nan."""
    for n, (k, p, b) in enumerate(zip(keys, logp, logbo), start=1):
        def bad(what: str, n: int = n) -> LMForgeError:
            return LMForgeError(f"n-gram tables {where} are inconsistent: order {n} {what}; retrain or restore them")

        if any(a.ndim != 1 for a in (k, p, b)) or not len(k) == len(p) == len(b):
            raise bad(f"has tables of lengths {len(k)}, {len(p)}, {len(b)}")
        if k.dtype.kind not in "iu" or p.dtype.kind != "f" or b.dtype.kind != "f":
            raise bad("has tables of the wrong types")
        if n == 1:
            if len(k) != V or not np.array_equal(k, np.arange(V)):
                raise bad(f"must list the {V} words of the vocabulary")
        elif len(k) and (k[0] < 0 or np.any(np.diff(k) <= 0) or k[-1] // V >= len(keys[n - 2])):
            raise bad("has unsorted keys or keys whose context is not an entry of the order below")
        if np.any(np.isnan(p)) or np.any(p > 1e-6) or np.any(np.isnan(b)) or np.any(np.isposinf(b)):
            raise bad("holds nan or positive log-probabilities")
