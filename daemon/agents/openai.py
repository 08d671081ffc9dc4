"""The `openai` backend: any OpenAI-compatible chat-completions API, through one pooled
httpx client.

The model writes the reply; the lead's name and bill value are still read with the
playbook's strict extractors, so qualification data does not depend on the model."""

from __future__ import annotations

import base64
import logging
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from daemon.agents import AgentReply, TurnInput, Usage
from daemon.agents.playbook import extract_money, extract_name
from daemon.config import Config
from daemon.errors import AgentError
from daemon.media.result import MediaResult
from daemon.models import KbEntry
from daemon.openai_http import error_text, one_line
from daemon.text import brl

log = logging.getLogger("sdr.agent")

SYSTEM_PROMPT = """\
Você é {persona}, SDR (pré-vendas) da {company}, uma empresa de energia solar, e atende \
leads pelo WhatsApp.

Como conversar:
- Responda sempre em português do Brasil, com mensagens curtas, simpáticas e naturais, \
como numa conversa de WhatsApp. Faça uma pergunta por vez.
- Qualifique o lead: descubra o nome, o valor médio da conta de luz por mês, o tipo de \
imóvel (casa, apartamento, comércio, indústria ou área rural) e se a pessoa é quem decide.
- Com essas informações, apresente a solução que faz sentido (energia solar por \
assinatura para contas menores, sistema fotovoltaico no telhado, ou projeto sob medida \
para alto consumo) e ofereça agendar uma conversa de 20 minutos com um consultor.
- Use apenas as informações da base de conhecimento para preços, prazos, financiamento e \
condições. Nunca invente valores: se não souber, diga que um consultor vai confirmar."""

# How each lead column is shown to the model; stage/solution keep the playbook's values.
LEAD_FIELDS = (
    ("name", "Nome"),
    ("bill_value", "Conta de luz média"),
    ("stage", "Etapa"),
    ("solution", "Solução indicada"),
)


class OpenAIAgent:
    name = "openai"

    def __init__(self, config: Config) -> None:
        p = config.profile
        self.model = config.agent.model
        self.vision_model = config.agent.vision_model  # "" = photos are described, not sent
        self.temperature = config.agent.temperature
        self.max_tokens = config.agent.max_tokens
        self.timeout = p.timeouts.agent
        self.system_prompt = SYSTEM_PROMPT.format(persona=config.agent.persona, company=config.agent.company)
        self._key = config.agent_api_key
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self.http = httpx.AsyncClient(
            base_url=config.agent.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(p.timeouts.agent),
            limits=httpx.Limits(max_connections=p.pools.http_max_connections),
        )

    async def close(self) -> None:
        await self.http.aclose()

    def knowledge_query(self, texts: list[str]) -> str | None:
        return " ".join(texts) or None  # the prompt always carries the knowledge base

    async def respond(self, turn: TurnInput) -> AgentReply:
        burst = "\n".join(turn.texts)
        entries = await turn.knowledge()
        photos = [r.jpeg for r in turn.media if r.jpeg] if self.vision_model else []
        body = {
            "model": self.vision_model if photos else self.model,
            "messages": self.messages(turn, burst, entries, photos),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        data = await self._post(body)
        text = self._content(data)
        updates: dict[str, Any] = {}
        if not turn.lead.get("name") and (name := extract_name(burst, loose=False)):
            updates["name"] = name
        if value := extract_money(burst, loose=False):
            updates["bill_value"] = value
        return AgentReply(text, updates, usage_of(data, body, text))

    def messages(
        self, turn: TurnInput, burst: str, entries: list[KbEntry], photos: list[bytes] | None = None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"role": "system", "content": self.system_prompt},
            {"role": "system", "content": context(turn.lead, entries)},
        ]
        for msg in turn.history:
            if msg.get("body"):  # media without a caption has no text to show
                role = "user" if msg.get("direction") == "in" else "assistant"
                out.append({"role": role, "content": msg["body"]})
        notes = media_notes(turn.media)
        text = "\n".join(x for x in (burst, notes) if x)
        if photos:  # the prepared (downscaled) JPEG, as OpenAI's image content part
            parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
            parts += [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}}
                for jpeg in photos
            ]
            out.append({"role": "user", "content": parts})
        else:
            out.append({"role": "user", "content": text})
        return out

    async def _post(self, body: dict[str, Any]) -> Any:
        try:
            resp = await self.http.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            raise AgentError(f"openai backend: no answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise AgentError(f"openai backend: request failed: {self._one_line(exc)}") from None
        if resp.status_code >= 400:
            raise AgentError(f"openai backend: HTTP {resp.status_code}: {self._one_line(error_text(resp))}")
        try:
            return resp.json()
        except ValueError:  # not JSON, or not even UTF-8
            raise AgentError("openai backend: the answer is not JSON") from None

    def _content(self, data: Any) -> str:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AgentError("openai backend: the answer has no choices[0].message.content") from None
        if not isinstance(content, str) or not content.strip():
            raise AgentError("openai backend: the answer's content is empty")
        if data["choices"][0].get("finish_reason") == "length":
            log.warning("openai reply cut short by max_tokens = %d", self.max_tokens)
        return content.strip()

    def _one_line(self, what: object) -> str:
        return one_line(what, self._key)


def usage_of(data: Any, body: dict[str, Any], text: str) -> Usage:
    """The answer's `usage`; counted (about 4 characters a token) when it has none, as
    some OpenAI-compatible servers omit it."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
            return Usage(prompt, completion)
    sent = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    return Usage(-(-sent // 4), -(-len(text) // 4), estimated=True)


def context(lead: dict[str, Any], entries: list[KbEntry]) -> str:
    """What we know of the lead and the knowledge-base entries for this burst."""
    known = []
    for key, label in LEAD_FIELDS:
        value = lead.get(key)
        if value in (None, ""):
            continue
        if key == "bill_value":
            try:
                value = brl(Decimal(str(value)))
            except InvalidOperation:
                pass
        known.append(f"- {label}: {value}")
    lead_part = "O que já sabemos do lead:\n" + "\n".join(known) if known else "Ainda não sabemos nada do lead."
    kb = "\n\n".join(f"## {e.title}\n{e.content}" for e in entries)
    kb_part = "Base de conhecimento:\n" + kb if kb else "Base de conhecimento: nada relevante para esta mensagem."
    return f"{lead_part}\n\n{kb_part}"


def media_notes(media: list[MediaResult]) -> str:
    """What the burst's photos and voice notes told us, for the model (pt-BR, like the prompt)."""
    notes = []
    for r in media:
        if r.kind == "image" and r.bill:
            b = r.bill
            found = [
                f"valor a pagar {brl(Decimal(b['amount']))}" if b.get("amount") else "",
                f"consumo {b['kwh']} kWh" if b.get("kwh") else "",
                f"distribuidora {b['distributor']}" if b.get("distributor") else "",
                f"vencimento {b['due_date']}" if b.get("due_date") else "",
            ]
            notes.append(
                "[O lead enviou a foto da conta de luz; lemos: "
                + ", ".join(x for x in found if x)
                + ". Confirme o valor com o lead.]"
            )
        elif r.kind == "image":
            notes.append("[O lead enviou uma imagem que não conseguimos ler; peça o valor da conta de luz.]")
        elif r.kind == "audio" and not r.transcript:
            why = "longo demais" if r.reason == "too_long" else "que não conseguimos ouvir"
            notes.append(f"[O lead enviou um áudio {why}; peça gentilmente que escreva a mensagem.]")
    return "\n".join(notes)
