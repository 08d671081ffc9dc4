"""The `playbook` backend: a deterministic pt-BR SDR qualification flow that runs offline.

Stages: new -> ask_name -> ask_bill -> offer_meeting -> booked (or nurture). Questions at
any stage are answered from the knowledge base first, then the flow goes on."""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Any

from daemon.agents import AgentReply, TurnInput
from daemon.config import AgentSettings

# Leads often skip the "?"; these openings make a question anyway. Ambiguous ones ("pode",
# "tem") are left out: "pode ser amanhã" is an answer, not a question.
QUESTION_STARTS = (
    "como ", "quanto", "quanta", "qual ", "quais ", "quando ", "onde ", "por que ",
    "porque ", "o que ", "e se ", "vale a pena",
)  # fmt: skip
GREETINGS = {
    "oi", "ola", "bom dia", "boa tarde", "boa noite", "opa", "eae", "e ai", "hello", "hi",
    "oie", "oii", "tudo bem", "blz", "beleza",
}  # fmt: skip
NAME_PATTERNS = re.compile(
    r"(?:meu nome (?:e|eh)|me chamo|pode me chamar de|aqui (?:e|eh)(?: o| a)?|eu sou (?:o |a )?|sou (?:o |a ))"
    r"[ ]*([a-z][a-z]+(?:[ ]+[a-z][a-z]+)?)"
)
NOT_NAMES = {
    "interessado", "interessada", "cliente", "dono", "dona", "eu", "que", "de", "da", "do",
    "e", "minha", "meu", "aqui", "tudo", "bem", "quero", "gostaria", "queria", "tenho", "moro",
}  # fmt: skip
MONEY = re.compile(r"(?:r\$\s*)?(\d{1,3}(?:\.\d{3})+(?:,\d{1,2})?|\d+(?:[.,]\d{1,2})?)\s*(mil\b|k\b)?")
YES = re.compile(r"\b(sim|pode|claro|bora|quero|vamos|ok|okay|combinado|fechado|perfeito|beleza|show|agenda|agendar|marca|marcar)\b")
NO = re.compile(r"\b(nao|agora nao|depois|sem interesse|nao quero|talvez depois)\b")
WHEN = re.compile(
    r"\b(hoje|amanha|segunda|terca|quarta|quinta|sexta|sabado|domingo|manha|tarde|noite"
    r"|\d{1,2}\s*(?:h|hs|horas|:\d{2})|\d{1,2}/\d{1,2})\b"
)


def fold(text: str) -> str:
    """Lower case without accents: how we compare what leads type."""
    norm = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in norm if not unicodedata.combining(c)).strip()


def is_question(text: str) -> bool:
    """A question for the knowledge base ("tudo bem?" is a greeting, not one)."""
    f = fold(text)
    return ("?" in f or f.startswith(QUESTION_STARTS)) and not is_greeting(text)


def is_greeting(text: str) -> bool:
    f = re.sub(r"[^a-z ]", "", fold(text)).strip()
    return f in GREETINGS or any(f.startswith(g + " ") and len(f) < 25 for g in GREETINGS)


def extract_name(text: str, *, loose: bool) -> str | None:
    """The lead's name from "meu nome é Ana", "sou o João" or, when `loose` (we just asked
    for it), a short answer like "Carlos Souza"."""
    original = text.strip()
    f = fold(original)
    match = NAME_PATTERNS.search(f)
    candidate = match.group(1) if match else None
    if candidate is None and loose:
        words = re.sub(r"[^a-z ]", "", f).split()
        if 1 <= len(words) <= 3 and not is_greeting(f) and not is_question(original) and not any(ch.isdigit() for ch in f):
            candidate = " ".join(words)
    if not candidate:
        return None
    words = candidate.split()
    if words[0] in NOT_NAMES:
        return None
    words = words[:1] + [w for w in words[1:2] if w not in NOT_NAMES]
    # Take the lead's own spelling (accents) from the original text when we can.
    originals = {fold(w): w for w in re.findall(r"[^\W\d_]+", original)}
    return " ".join(originals.get(w, w).capitalize() for w in words[:2])


def extract_money(text: str, *, loose: bool) -> Decimal | None:
    """A bill value from "R$ 487,35", "uns 450 reais", "1.200" or "2 mil"; a bare number
    counts only when `loose` (we just asked for the value)."""
    f = fold(text)
    for match in MONEY.finditer(f):
        raw, mult = match.group(1), match.group(2)
        context = f[max(0, match.start() - 3) : match.end() + 8]
        if not loose and "r$" not in context and "reais" not in context and not mult:
            continue
        if "kwh" in f[match.end() : match.end() + 5]:
            continue
        number = raw.replace(".", "").replace(",", ".") if ("," in raw or raw.count(".") > 1 or re.search(r"\.\d{3}$", raw)) else raw
        try:
            value = Decimal(number)
        except InvalidOperation:
            continue
        if mult:
            value *= 1000
        if Decimal(20) <= value <= Decimal(500000):
            return value.quantize(Decimal("0.01"))
    return None


def brl(value: Decimal | float) -> str:
    """R$ 1.234,56 as Brazilians write it."""
    text = f"{Decimal(value):,.2f}"
    return "R$ " + text.replace(",", "X").replace(".", ",").replace("X", ".")


class Playbook:
    name = "playbook"

    def __init__(self, settings: AgentSettings) -> None:
        self.persona = settings.persona
        self.company = settings.company

    async def close(self) -> None:
        """Nothing to release: the playbook holds no connections."""

    async def respond(self, turn: TurnInput) -> AgentReply:
        lead = turn.lead
        stage = lead.get("stage") or "new"
        text = "\n".join(t for t in turn.texts if t.strip())
        updates: dict[str, Any] = {}
        parts: list[str] = []

        if text and is_question(text):
            entries = await turn.knowledge()
            if entries:
                parts.append(entries[0].content)
            else:
                parts.append(
                    "Boa pergunta! Vou confirmar essa informação com um dos nossos "
                    "consultores e te retorno por aqui."
                )
        answered = bool(parts)

        name = lead.get("name")
        if stage == "new":
            name = name or extract_name(text, loose=False)
            if name:
                updates["name"] = name
            value = extract_money(text, loose=False)
            if name and value:
                return self._present(parts, name, value, updates)
            if name:
                parts.insert(0, f"Olá, {name}! Eu sou a {self.persona}, da {self.company} ☀️")
                parts.append(self._ask_bill())
                updates["stage"] = "ask_bill"
            else:
                parts.insert(0, f"Olá! Eu sou a {self.persona}, da {self.company} ☀️ Que bom ter você por aqui!")
                parts.append("Para começar, como posso te chamar?")
                updates["stage"] = "ask_name"
        elif stage == "ask_name":
            found = extract_name(text, loose=not answered)
            if found:
                updates.update(name=found, stage="ask_bill")
                parts.append(f"Prazer, {found}! " + self._ask_bill())
            else:
                parts.append("E como posso te chamar?")
        elif stage == "ask_bill":
            value = extract_money(text, loose=not answered)
            if value:
                return self._present(parts, name, value, updates)
            if answered:
                parts.append("E me conta: quanto vem, em média, a sua conta de luz por mês?")
            else:
                parts.append(
                    "Não consegui entender o valor 😅 Quanto vem, em média, a sua conta de "
                    "luz por mês? Pode ser aproximado, por exemplo: R$ 350."
                )
        elif stage == "offer_meeting":
            f = fold(text)
            if WHEN.search(f) or (YES.search(f) and not NO.search(f)):
                when = self._when(text)
                updates.update(stage="booked")
                parts.append(
                    f"Combinado{', ' + name if name else ''}! Anotei sua preferência{when}. "
                    f"Um consultor da {self.company} vai te chamar aqui no WhatsApp para "
                    "confirmar o horário. Obrigada! ☀️"
                )
            elif NO.search(f):
                updates.update(stage="nurture")
                parts.append(
                    "Sem problemas! Fico à disposição: quando quiser conversar sobre a sua "
                    "economia com energia solar, é só me chamar por aqui."
                )
            elif answered:
                parts.append("Quer que eu agende uma conversa rápida com um consultor? Qual dia e horário ficam bons?")
            else:
                parts.append("Posso agendar uma conversa de 20 minutos com um consultor? Qual dia e horário ficam melhores para você?")
        else:  # booked, nurture
            f = fold(text)
            if stage == "nurture" and YES.search(f) and not answered:
                updates.update(stage="offer_meeting")
                parts.append("Que ótimo! Qual dia e horário ficam melhores para uma conversa de 20 minutos com um consultor?")
            elif not answered:
                parts.append(f"Qualquer dúvida é só me chamar por aqui{', ' + name if name else ''}! ☀️")
        return AgentReply("\n\n".join(parts), updates)

    @staticmethod
    def _ask_bill() -> str:
        return (
            "Para eu calcular quanto você pode economizar, me conta: quanto vem, em média, "
            "a sua conta de luz por mês?"
        )

    def _present(
        self, parts: list[str], name: str | None, value: Decimal, updates: dict[str, Any]
    ) -> AgentReply:
        updates.update(bill_value=value, stage="offer_meeting")
        who = f"{name}, c" if name else "C"
        if value < 300:
            updates["solution"] = "assinatura"
            parts.append(
                f"{who}om uma conta de {brl(value)}, a melhor opção é a nossa energia solar por "
                "assinatura: você recebe créditos de uma usina solar parceira e economiza até "
                "15% todo mês, sem obra e sem investimento."
            )
        elif value < 1500:
            updates["solution"] = "residencial"
            monthly = value * Decimal("0.9")
            parts.append(
                f"{who}om uma conta de {brl(value)}, um sistema fotovoltaico no seu telhado "
                f"pode reduzir a conta em até 90%: uma economia de cerca de {brl(monthly)} por "
                f"mês, ou {brl(monthly * 12)} por ano. E dá para financiar com parcelas que "
                "cabem no valor que você já paga hoje."
            )
        else:
            updates["solution"] = "projeto_sob_medida"
            parts.append(
                f"{who}om uma conta de {brl(value)}, o ideal é um projeto sob medida "
                "(comercial, rural ou residencial de alto consumo), com economia de até 90% "
                "e retorno do investimento em poucos anos."
            )
        parts.append(
            "Posso agendar uma conversa de 20 minutos com um dos nossos consultores para te "
            "mostrar a proposta? Qual dia e horário ficam melhores para você?"
        )
        return AgentReply("\n\n".join(parts), updates)

    @staticmethod
    def _when(text: str) -> str:
        match = WHEN.search(fold(text))
        if not match:
            return ""
        # Quote the lead's own words around the day/time they gave.
        return f" ({text.strip()[:80]})"
