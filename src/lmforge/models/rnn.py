"""Recurrent language models: Elman RNN (tanh), GRU and LSTM (Mikolov 2010; Zaremba et al. 2014).

    e_t = E x_t                                  (embedding, dropout)
    h_t^l = Cell^l(h_t^{l-1}, h_{t-1}^l)          (stacked recurrent layers, dropout between them)
    p(x_{t+1} | x_<=t) = softmax(W h_t^L + b)     (linear head, optionally tied to E)

The recurrent state summarises the whole prefix, so there is no context limit: training uses
truncated back-propagation through time (TBPTT) over the packed token stream, carrying the hidden
state from one window to the next (detached), and resetting it where a document ends. The fused
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` kernels run the recurrence; :class:`LSTMCellRef` spells out
the LSTM equations for the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import Options, option
from ..utils import native_bf16
from .base import MAX_CONTEXT, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, PRESET, LanguageModel, Trace, masked_cross_entropy

RNNState = Any  # (h, c) for LSTM, h for GRU/RNN; h of shape (n_layer, B, hidden)


@dataclass
class RNNConfig(Options):
    vocab_size: int = option(256, ge=1, le=MAX_VOCAB, cli=False, help="output vocabulary (from the data)")
    cell: Literal["rnn", "gru", "lstm"] = option("lstm", cli=False, help="recurrent cell (set by --model)")
    n_layer: int = option(2, ge=1, le=MAX_LAYERS, help="recurrent layers", default_text=PRESET)
    n_embd: int = option(256, ge=1, le=MAX_WIDTH, help="embedding width", default_text=PRESET)
    hidden: int = option(512, ge=1, le=MAX_WIDTH, help="RNN: recurrent state width", default_text=PRESET)
    block_size: int = option(128, ge=1, le=MAX_CONTEXT, help="RNN: TBPTT window (tokens per training sequence)",
                             default_text=PRESET)
    dropout_emb: float = option(0.1, ge=0, lt=1, cli=False, help="dropout on the embeddings")
    dropout: float = option(0.2, ge=0, lt=1, help="dropout between recurrent layers", default_text=PRESET)
    dropout_out: float = option(0.2, ge=0, lt=1, cli=False, help="dropout before the head")
    tie_embeddings: bool = option(False, help="share the embedding with the head (a projection is added when "
                                  "n_embd != hidden)", default_text=PRESET)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=1, n_embd=64, hidden=128, block_size=64, dropout=0.0, dropout_emb=0.0, dropout_out=0.0),
    "small": dict(n_layer=2, n_embd=128, hidden=384, block_size=128, dropout=0.1, dropout_emb=0.0,
                  dropout_out=0.1),
    "medium": dict(n_layer=2, n_embd=256, hidden=650, block_size=256, dropout=0.5, dropout_emb=0.1,
                   dropout_out=0.5),  # Zaremba et al.'s medium model
}


class LSTMCellRef(nn.Module):
    """The LSTM equations, one step (Hochreiter & Schmidhuber 1997, with a forget gate):

        i, f, g, o = sigma(W_i x + U_i h + b_i), sigma(.), tanh(.), sigma(.)
        c' = f * c + i * g
        h' = o * tanh(c')

    Gate order (i, f, g, o) and weight layout match ``nn.LSTM``, so its weights can be loaded here."""

    def __init__(self, input_size: int, hidden: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.zeros(4 * hidden))
        self.bias_hh = nn.Parameter(torch.zeros(4 * hidden))
        nn.init.uniform_(self.weight_ih, -hidden ** -0.5, hidden ** -0.5)
        nn.init.uniform_(self.weight_hh, -hidden ** -0.5, hidden ** -0.5)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, c = state
        outs = []
        for t in range(x.size(1)):
            gates = x[:, t] @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class RNNLM(nn.Module, LanguageModel):
    model_type = "rnn"
    config_class = RNNConfig
    presets = PRESETS
    default_preset = "small"
    stateful = True  # the trainer carries the state across windows (TBPTT)
    has_state_norm = True

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        rnn_cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[c.cell]
        self.rnn = rnn_cls(c.n_embd, c.hidden, num_layers=c.n_layer, batch_first=True,
                           dropout=c.dropout if c.n_layer > 1 else 0.0)
        self.drop_emb, self.drop_out = nn.Dropout(c.dropout_emb), nn.Dropout(c.dropout_out)
        self.proj = nn.Linear(c.hidden, c.n_embd, bias=False) if c.tie_embeddings and c.hidden != c.n_embd \
            else None
        self.head = nn.Linear(c.n_embd if self.proj is not None else c.hidden, c.vocab_size)
        if c.tie_embeddings:
            self.head.weight = self.embedding.weight
        # The embedding keeps PyTorch's N(0, 1) init: with small inputs (std 0.05 was tried) the LSTM sits on
        # the unigram plateau (loss 3.3) for hundreds of steps; with N(0, 1) it is at 2.0 after 150 steps.
        self.eot_id: int | None = None  # set from the tokenizer: where the state is reset

    @classmethod
    def preset_fields(cls) -> dict[str, Any]:
        return {"cell": cls.model_type}  # rnn | gru | lstm

    # --- state ---------------------------------------------------------------------------------
    def init_state(self, batch_size: int, max_length: int = 0) -> RNNState:
        c = self.config
        p = self.head.weight
        h = torch.zeros(c.n_layer, batch_size, c.hidden, device=p.device, dtype=p.dtype)
        return (h, h.clone()) if c.cell == "lstm" else h

    @staticmethod
    def _map_state(state: RNNState, fn: Any) -> RNNState:
        return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)

    def detach_state(self, state: RNNState) -> RNNState:
        return self._map_state(state, lambda s: s.detach())

    def state_select(self, state: RNNState, index: torch.Tensor) -> RNNState:
        return self._map_state(state, lambda s: s.index_select(1, index))

    def _reset_rows(self, state: RNNState, rows: torch.Tensor) -> RNNState:
        keep = (~rows).to(self.head.weight.dtype)[None, :, None]
        return self._map_state(state, lambda s: s * keep)

    # --- the model -----------------------------------------------------------------------------
    def _recur(self, x: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """The fused recurrent kernel; under bf16 autocast on a CPU without native bf16 (where oneDNN's
        LSTM has no bf16 kernel at all) it runs in fp32."""
        if torch.is_autocast_enabled("cpu") and not native_bf16():
            with torch.autocast("cpu", enabled=False):
                st = self._map_state(state, lambda s: s.float()) if state is not None else None
                return self.rnn(x.float(), st)
        return self.rnn(x, state)

    def _run(self, x: torch.Tensor, idx: torch.Tensor, state: RNNState) -> tuple[torch.Tensor, RNNState]:
        """Run the recurrence; where an input token is end-of-text, the state after it is reset, so
        no information flows from one document into the next. Windows are split only at such
        positions (rare), so the fused kernel still does almost all the work."""
        if self.eot_id is None:
            return self._recur(x, state)
        is_eot = idx == self.eot_id
        cuts = torch.nonzero(is_eot[:, :-1].any(0)).flatten().tolist()
        if not cuts:
            y, state = self._recur(x, state)
            return y, self._reset_rows(state, is_eot[:, -1]) if bool(is_eot[:, -1].any()) else state
        outs, start = [], 0
        for p in cuts + [x.size(1) - 1]:
            y, state = self._recur(x[:, start:p + 1], state)
            outs.append(y)
            if bool(is_eot[:, p].any()):
                state = self._reset_rows(state, is_eot[:, p])
            start = p + 1
        return torch.cat(outs, dim=1), state

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: RNNState = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, RNNState]:
        if state is None:
            state = self.init_state(idx.size(0))
        x = self.drop_emb(self.embedding(idx))
        y, state = self._run(x, idx, state)
        y = self.drop_out(y)
        if self.proj is not None:
            y = self.proj(y)
        logits = self.head(y)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss, state

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], state: RNNState = None
             ) -> tuple[torch.Tensor, torch.Tensor, RNNState]:
        idx, labels = batch                                   # (B, T) each; labels -100 = no target
        logits, _, state = self(idx, state=state)             # (B, T, V), state after the window
        return (*masked_cross_entropy(logits, labels), state)

    # --- LanguageModel protocol ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> None:
        return None

    def forward_logits(self, input_ids: torch.Tensor, state: RNNState = None,
                       last_only: bool = False) -> tuple[torch.Tensor, RNNState]:
        logits, _, state = self(input_ids, state=state)
        return (logits[:, -1:] if last_only else logits), state

    def trace(self, input_ids: torch.Tensor, targets: torch.Tensor, state: RNNState = None,
              source_ids: torch.Tensor | None = None) -> tuple[Trace, RNNState]:
        if state is None:
            state = self.init_state(input_ids.size(0))
        y, state = self._run(self.drop_emb(self.embedding(input_ids)), input_ids, state)  # y: h_t of the top layer
        logits = self.head(self.proj(y) if self.proj is not None else y)
        return Trace(logits[0], state_norm=y[0].norm(dim=-1)), state

    def param_groups(self, weight_decay: float) -> list[dict]:
        decay, no_decay, seen = [], [], set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and "rnn." not in name else no_decay).append(p)
        # Recurrent matrices are not decayed: weight decay on U shrinks the memory of the state.
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def hidden_matrices(self) -> list[nn.Parameter]:
        # the input and recurrent matrices W, U of every layer (all gates stacked, as nn.LSTM keeps them)
        return [p for p in self.rnn.parameters() if p.dim() == 2]

    def flops_per_token(self) -> float:
        return 6.0 * self.num_parameters()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "tokenizer" and value is not None:
            super().__setattr__("eot_id", value.eot_id)


class LSTMLM(RNNLM):
    model_type = "lstm"


class GRULM(RNNLM):
    model_type = "gru"
