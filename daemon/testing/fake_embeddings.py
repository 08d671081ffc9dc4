"""A fake OpenAI-compatible embeddings API (POST /v1/embeddings): a real HTTP server
(Starlette behind uvicorn on a free loopback port) that answers in OpenAI's wire format and
records what it received.

Two encoders make the vectors:
- "minilm": a real sentence-embedding model, all-MiniLM-L6-v2 run with numpy
  (daemon/testing/minilm.py; imported only when asked for, it needs the dev dependencies),
  for quality numbers of the knowledge base's vector search;
- "hash": a deterministic bag of hashed words (no model, pure Python), for tests of the
  wiring that must not depend on a model: texts sharing words get close vectors, and
  nothing else is meaningful about them.

The request is OpenAI's: `{"model", "input": str | list[str], "encoding_format"?: "float" |
"base64", "dimensions"?}`; the answer `{"object": "list", "data": [{"object": "embedding",
"index", "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}`. Errors have
OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for a request OpenAI
refuses too (no model, no input, an empty list or string, an item that is not a string
(token arrays are not supported here), more than 2048 inputs, an unknown encoding_format,
dimensions other than the encoder's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import struct
import unicodedata
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from daemon.testing.fake_openai import _wait_or_disconnect, openai_error
from daemon.testing.servers import background_server, quiet_server

if TYPE_CHECKING:
    from daemon.testing.minilm import MiniLM

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request
_WORDS = re.compile(r"\w+")


class Encoder(Protocol):
    """What turns texts into vectors for the fake."""

    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> list[list[float]]: ...

    def tokens(self, texts: list[str]) -> int:
        """The request's prompt_tokens."""
        ...


@dataclass
class HashEncoder:
    """Each word (case- and accent-folded: "Instalação" is "instalacao") adds +-1 to one of
    `dimensions` components, both chosen by its BLAKE2b hash; the sum is L2-normalised. A text
    without words hashes whole, so no vector is zero. Deterministic across processes."""

    dimensions: int = 384
    name: str = "hash"

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self.vector(text) for text in texts]

    def vector(self, text: str) -> list[float]:
        values = [0.0] * self.dimensions
        for word in words(text) or [text]:
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            values[h % self.dimensions] += 1.0 if h >> 63 else -1.0
        norm = math.sqrt(sum(v * v for v in values))
        if norm == 0.0:  # the words cancelled out
            values[0], norm = 1.0, 1.0
        return [v / norm for v in values]

    def tokens(self, texts: list[str]) -> int:
        return sum(max(len(words(t)), 1) for t in texts)


def words(text: str) -> list[str]:
    """The hash encoder's words: casefolded, accents dropped."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return _WORDS.findall("".join(c for c in folded if not unicodedata.combining(c)))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (numpy): unit-norm vectors of 384; prompt_tokens are its own
    WordPiece tokens ([CLS] and [SEP] included, at most 256 per text as it truncates)."""

    name = "minilm"

    def __init__(self, model: MiniLM | None = None) -> None:
        if model is None:
            from daemon.testing.minilm import MiniLM  # numpy, tokenizers: dev dependencies

            model = MiniLM()
        self.model = model
        self.dimensions = model.dimensions

    def embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = self.model.embed(texts).tolist()
        return vectors

    def tokens(self, texts: list[str]) -> int:
        return sum(self.model.token_counts(texts))


def make_encoder(name: str) -> Encoder:
    if name == "hash":
        return HashEncoder()
    if name == "minilm":
        return MiniLMEncoder()
    raise ValueError(f"unknown encoder {name!r} (hash or minilm)")


@dataclass
class FakeEmbeddings:
    """Knobs: `status` (>= 400 answers an OpenAI-style error instead of vectors, after the
    request's own checks), `delay` (seconds before answering; a client that hangs up first
    ends the wait). `requests` records every POST: {"model", "inputs" (how many texts; 0
    when the input was invalid), "input" (as sent), "encoding_format", "authorization"}."""

    encoder: Encoder = field(default_factory=HashEncoder)
    url: str = ""  # base URL, ending in /v1
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0

    def app(self) -> Starlette:
        async def embeddings(request: Request) -> Response:
            try:
                body = json.loads(await request.body())
            except ValueError:
                return openai_error(400, "We could not parse the JSON body of your request.")
            if not isinstance(body, dict):
                return openai_error(400, "The request body must be a JSON object.")
            texts = _texts(body.get("input"))
            self.requests.append(
                {
                    "model": body.get("model"),
                    "inputs": len(texts) if isinstance(texts, list) else 0,
                    "input": body.get("input"),
                    "encoding_format": body.get("encoding_format"),
                    "authorization": request.headers.get("authorization"),
                }
            )
            if invalid := self._invalid(body, texts):
                return invalid
            assert isinstance(texts, list)
            if self.delay and await _wait_or_disconnect(request, self.delay):
                return Response(status_code=499)  # nobody reads it
            if self.status >= 400:
                return openai_error(self.status, "fake failure")
            vectors = await asyncio.to_thread(self.encoder.embed, texts)
            tokens = await asyncio.to_thread(self.encoder.tokens, texts)
            as_base64 = body.get("encoding_format") == "base64"
            data = [
                {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v}
                for i, v in enumerate(vectors)
            ]
            usage = {"prompt_tokens": tokens, "total_tokens": tokens}
            return JSONResponse({"object": "list", "data": data, "model": body["model"], "usage": usage})

        return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"])])

    def _invalid(self, body: dict[str, Any], texts: list[str] | str) -> Response | None:
        """The 400 OpenAI answers to this request, if any."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return openai_error(400, "you must provide a model parameter")
        if isinstance(texts, str):
            return openai_error(400, texts, param="input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            return openai_error(
                400, f"Invalid value for 'encoding_format': {fmt!r} (float or base64)", param="encoding_format"
            )
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != self.encoder.dimensions:
            return openai_error(400, "This model does not support specifying dimensions.", param="dimensions")
        return None


def _texts(value: Any) -> list[str] | str:
    """The inputs as a list of texts, or why they are invalid."""
    if value is None:
        return "'input' is a required property"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return f"'$.input' is invalid: {type(value).__name__}, not a string or a list of strings"
    if not value:
        return "'$.input' is invalid: an empty list"
    if len(value) > MAX_INPUTS:
        return f"Too many inputs. The max number of inputs is {MAX_INPUTS}. We received {len(value)}."
    for i, text in enumerate(value):
        if not isinstance(text, str):
            return f"'$.input[{i}]' is invalid: {type(text).__name__}, not a string (token arrays are not supported)"
        if not text:
            return f"'$.input[{i}]' is invalid: an empty string"
    return value


def _base64(vector: Sequence[float]) -> str:
    """OpenAI's encoding_format=base64: the float32 values, little-endian, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


@contextlib.asynccontextmanager
async def run_fake_embeddings(encoder: str | Encoder = "hash") -> AsyncIterator[FakeEmbeddings]:
    """The fake on a free loopback port; `encoder` by name ("hash", "minilm": the model
    loads first, in a thread) or an instance (a test module shares one loaded model)."""
    chosen = await asyncio.to_thread(make_encoder, encoder) if isinstance(encoder, str) else encoder
    fake = FakeEmbeddings(chosen)
    async with background_server(quiet_server(fake.app())) as url:
        fake.url = f"{url}/v1"
        yield fake
