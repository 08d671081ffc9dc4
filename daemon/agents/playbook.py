"""The `playbook` backend: a deterministic pt-BR SDR qualification flow that runs offline.

Stages: new -> ask_name -> ask_bill -> offer_meeting -> booked (or nurture). Questions at
any stage are answered from the knowledge base first, then the flow goes on."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from daemon.agents import AgentReply, TurnInput
from daemon.config import AgentSettings
from daemon.followups.calendar import BusinessHours, Clock, utc_now
from daemon.followups.meeting import parse_meeting
from daemon.media.result import MediaResult
from daemon.text import brl, fold

# Leads often skip the "?"; these openings make a question anyway. Ambiguous ones ("pode",
# "tem") are left out: "pode ser amanhã" is an answer, not a question.
QUESTION_STARTS = (
    "como ",
    "quanto",
    "quanta",
    "qual ",
    "quais ",
    "quando ",
    "onde ",
    "por que ",
    "porque ",
    "o que ",
    "e se ",
    "vale a pena",
)
GREETINGS = {
    "oi",
    "ola",
    "bom dia",
    "boa tarde",
    "boa noite",
    "opa",
    "eae",
    "e ai",
    "hello",
    "hi",
    "oie",
    "oii",
    "tudo bem",
    "blz",
    "beleza",
}
NAME_PATTERNS = re.compile(
    r"(?:meu nome (?:e|eh)|me chamo|pode me chamar de|aqui (?:e|eh)(?: o| a)?|eu sou (?:o |a )?|sou (?:o |a ))"
    r"[ ]*([a-z][a-z]+(?:[ ]+[a-z][a-z]+)?)"
)
NOT_NAMES = {
    "interessado",
    "interessada",
    "cliente",
    "dono",
    "dona",
    "eu",
    "que",
    "de",
    "da",
    "do",
    "e",
    "minha",
    "meu",
    "aqui",
    "tudo",
    "bem",
    "quero",
    "gostaria",
    "queria",
    "tenho",
    "moro",
}
MONEY = re.compile(r"(?:r\$\s*)?(\d{1,3}(?:\.\d{3})+(?:,\d{1,2})?|\d+(?:[.,]\d{1,2})?)\s*(mil\b|k\b)?")
YES = re.compile(
    r"\b(sim|pode|claro|bora|quero|vamos|ok|okay|combinado|fechado|perfeito|beleza|show|agenda|agendar|marca|marcar)\b"
)
NO = re.compile(r"\b(nao|agora nao|depois|sem interesse|nao quero|talvez depois)\b")
WHEN = re.compile(
    r"\b(hoje|amanha|segunda|terca|quarta|quinta|sexta|sabado|domingo|manha|tarde|noite"
    r"|\d{1,2}\s*(?:h|hs|horas|:\d{2})|\d{1,2}/\d{1,2})\b"
)


def is_question(text: str) -> bool:
    """A question for the knowledge base ("tudo bem?" is a greeting, not one)."""
    f = fold(text)
    return ("?" in f or f.startswith(QUESTION_STARTS)) and not is_greeting(text)


def questions_in(texts: list[str]) -> str | None:
    """The burst's questions, which is what the knowledge base is searched for: the same
    question after different small talk is the same search (and the same cache entry)."""
    asked = [t for t in texts if is_question(t)]
    if not asked and is_question(" ".join(texts)):
        asked = texts
    return " ".join(asked) or None


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
        if (
            1 <= len(words) <= 3
            and not is_greeting(f)
            and not is_question(original)
            and not any(ch.isdigit() for ch in f)
        ):
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
        number = (
            raw.replace(".", "").replace(",", ".")
            if ("," in raw or raw.count(".") > 1 or re.search(r"\.\d{3}$", raw))
            else raw
        )
        try:
            value = Decimal(number)
        except InvalidOperation:
            continue
        if mult:
            value *= 1000
        if Decimal(20) <= value <= Decimal(500000):
            return value.quantize(Decimal("0.01"))
    return None


PROPERTY_WORDS = (
    ("apartamento", ("apartamento", "apto", "ap ", "condominio", "predio")),
    ("rural", ("sitio", "fazenda", "chacara", "rural", "roca")),
    (
        "comercial",
        ("comercio", "empresa", "loja", "galpao", "escritorio", "industria", "comercial", "mercado", "restaurante"),
    ),
    ("casa", ("casa", "residencia", "sobrado", "moradia")),
)
OTHERS = re.compile(
    r"\b(esposa|marido|mulher|conjuge|socio|socia|socios|familia|pai|mae|filho|filha|sogr[oa]|"
    r"irma|irmao|namorad[oa]|nos dois|a gente|junto|juntos|tambem)\b"
)
MYSELF = re.compile(r"\b(sou eu|so eu|eu mesm[oa]|eu decido|minha|sim|sou|eu)\b")
PROPERTY_LABEL = {
    "casa": "sua casa",
    "apartamento": "seu apartamento",
    "comercial": "sua empresa",
    "rural": "sua propriedade rural",
}


def extract_property(text: str) -> str | None:
    f = fold(text) + " "
    for kind, words in PROPERTY_WORDS:
        if any(w in f for w in words):
            return kind
    return None


class _Turn:
    """What one reply is being built from, and what it learns."""

    def __init__(self, lead: dict[str, Any], text: str) -> None:
        self.lead = lead
        self.text = text
        self.parts: list[str] = []
        self.updates: dict[str, Any] = {}
        self.answered = False  # a question was answered from the knowledge base

    @property
    def name(self) -> str | None:
        return self.updates.get("name") or self.lead.get("name")

    def say(self, text: str) -> None:
        self.parts.append(text)


class Playbook:
    """Stages: new -> ask_name -> ask_bill -> ask_property -> ask_decision -> offer_meeting
    -> booked (or nurture). A question at any stage is answered from the knowledge base
    first, then the flow goes on where it was."""

    name = "playbook"

    def __init__(self, settings: AgentSettings, hours: BusinessHours | None = None, clock: Clock = utc_now) -> None:
        self.persona = settings.persona
        self.company = settings.company
        self.hours = hours  # to read a meeting time ("sexta às 15h") in the business's zone
        self.clock = clock  # ... and on its calendar: which Friday is "sexta"

    async def close(self) -> None:
        """Nothing to release: the playbook holds no connections."""

    def knowledge_query(self, texts: list[str]) -> str | None:
        return questions_in(texts)

    async def respond(self, turn: TurnInput) -> AgentReply:
        t = _Turn(turn.lead, "\n".join(x for x in turn.texts if x.strip()))
        if t.text and is_question(t.text):
            entries = await turn.knowledge()
            t.say(
                entries[0].content
                if entries
                else (
                    "Boa pergunta! Vou confirmar essa informação com um dos nossos consultores e te retorno por aqui."
                )
            )
            t.answered = True
        stage = turn.lead.get("stage") or "new"
        if self._media(t, turn.media, stage):
            return AgentReply("\n\n".join(t.parts), t.updates)
        handler = {
            "new": self._new,
            "ask_name": self._ask_name,
            "ask_bill": self._ask_bill,
            "ask_property": self._ask_property,
            "ask_decision": self._ask_decision,
            "offer_meeting": self._offer_meeting,
            "confirm_bill": self._confirm_bill,
        }.get(stage, self._after)
        handler(t)
        return AgentReply("\n\n".join(t.parts), t.updates)

    # --- photos and voice notes -----------------------------------------------------------

    def _media(self, t: _Turn, results: list[MediaResult], stage: str) -> bool:
        """Answers what the burst's media needs; True when that is the whole reply."""
        early = stage in ("new", "ask_name", "ask_bill", "confirm_bill")
        for r in results:
            if r.kind == "image" and r.bill and r.bill.get("amount"):
                value = Decimal(r.bill["amount"])
                t.updates["bill_value"] = value
                if r.bill.get("kwh"):
                    t.updates["consumption_kwh"] = int(r.bill["kwh"])
                kwh = f" ({r.bill['kwh']} kWh)" if r.bill.get("kwh") else ""
                if stage == "new":
                    name = extract_name(t.text, loose=False)
                    if name:
                        t.updates["name"] = name
                    t.say(f"Olá{', ' + name if name else ''}! Eu sou a {self.persona}, da {self.company} ☀️")
                self._to(
                    t,
                    "confirm_bill",
                    f"Recebi a foto da sua conta 📄 Vi aqui que sua conta veio {brl(value)}{kwh}, certo?",
                )
                return True
            if r.kind == "image":
                if r.outcome == "refused":
                    t.say("Não consegui abrir essa imagem 😕")
                else:
                    t.say("Recebi a foto, obrigada!")
                if early and not t.text:
                    self._to(
                        t,
                        "ask_bill",
                        "Não consegui ler o valor da conta por aqui: quanto veio a sua conta de luz no último mês?",
                    )
                    return True
            elif r.kind == "audio" and not r.transcript:
                if r.reason == "too_long":
                    t.say(
                        "Seu áudio ficou um pouco longo para mim 😅 Consegue me mandar um áudio mais curto, ou escrever por aqui?"
                    )
                else:
                    t.say("Não consigo ouvir áudios por aqui 😅 Pode me escrever a sua mensagem?")
                if not t.text:
                    return True
        return False

    def _confirm_bill(self, t: _Turn) -> None:
        f = fold(t.text)
        value = extract_money(t.text, loose=True)
        if value:  # "não, veio 520" or just the right value: take it
            self._got_bill(t, value)
        elif NO.search(f):
            self._to(t, "ask_bill", "Sem problemas! Qual é o valor certo da sua conta de luz?")
        elif YES.search(f) or "certo" in f or "isso" in f:
            self._got_bill(t, Decimal(str(t.lead.get("bill_value") or 0)))
        else:
            value = Decimal(str(t.lead.get("bill_value") or 0))
            t.say(f"Só para confirmar: sua conta de luz veio {brl(value)}?")

    # --- stages -------------------------------------------------------------------------

    def _new(self, t: _Turn) -> None:
        name = extract_name(t.text, loose=False)
        hello = f"Eu sou a {self.persona}, da {self.company} ☀️"
        if name:
            t.updates["name"] = name
            t.parts.insert(0, f"Olá, {name}! {hello}")
            value = extract_money(t.text, loose=False)
            if value:
                self._got_bill(t, value)
            else:
                self._to(t, "ask_bill", BILL_QUESTION)
        else:
            t.parts.insert(0, f"Olá! {hello} Que bom ter você por aqui!")
            self._to(t, "ask_name", "Para começar, como posso te chamar?")

    def _ask_name(self, t: _Turn) -> None:
        found = extract_name(t.text, loose=not t.answered)
        if found:
            t.updates["name"] = found
            self._to(t, "ask_bill", f"Prazer, {found}! {BILL_QUESTION}")
        else:
            t.say("E como posso te chamar?")

    def _ask_bill(self, t: _Turn) -> None:
        value = extract_money(t.text, loose=not t.answered)
        if value:
            self._got_bill(t, value)
        elif t.answered:
            t.say("E me conta: quanto vem, em média, a sua conta de luz por mês?")
        else:
            t.say(
                "Não consegui entender o valor 😅 Quanto vem, em média, a sua conta de luz por "
                "mês? Pode ser aproximado, por exemplo: R$ 350."
            )

    def _got_bill(self, t: _Turn, value: Decimal) -> None:
        t.updates["bill_value"] = value
        self._to(
            t,
            "ask_property",
            f"Anotado: conta de {brl(value)} por mês. E o imóvel é casa, apartamento, comércio ou propriedade rural?",
        )

    def _ask_property(self, t: _Turn) -> None:
        kind = extract_property(t.text)
        if kind is None:
            if not t.answered:
                t.say("Só para eu indicar a solução certa: é casa, apartamento, comércio ou propriedade rural?")
            else:
                t.say("E o imóvel é casa, apartamento, comércio ou propriedade rural?")
            return
        t.updates["property_type"] = kind
        self._to(
            t,
            "ask_decision",
            "Perfeito! E a decisão sobre a energia aí é só sua, ou tem mais alguém envolvido "
            "(cônjuge, sócio, família)?",
        )

    def _ask_decision(self, t: _Turn) -> None:
        f = fold(t.text)
        if t.answered and not (OTHERS.search(f) or MYSELF.search(f)):
            t.say("E a decisão sobre a energia é só sua, ou tem mais alguém envolvido?")
            return
        shared = bool(OTHERS.search(f))
        t.updates["decision_maker"] = "compartilhada" if shared else "lead"
        self._present(t, shared)

    def _present(self, t: _Turn, shared: bool) -> None:
        value = Decimal(str(t.lead.get("bill_value") or t.updates.get("bill_value") or 0))
        kind = t.updates.get("property_type") or t.lead.get("property_type") or "casa"
        where = PROPERTY_LABEL.get(kind, "seu imóvel")
        who = f"{t.name}, c" if t.name else "C"
        if kind == "apartamento" or value < 300:
            t.updates["solution"] = "assinatura"
            t.say(
                f"{who}om uma conta de {brl(value)}, a melhor opção para {where} é a nossa energia "
                "solar por assinatura: você recebe créditos de uma usina solar parceira e economiza "
                "até 15% todo mês, sem obra, sem telhado e sem investimento."
            )
        elif kind in ("comercial", "rural") or value >= 1500:
            t.updates["solution"] = "projeto_sob_medida"
            t.say(
                f"{who}om uma conta de {brl(value)}, o ideal para {where} é um projeto sob medida, "
                "com economia de até 90% na conta e retorno do investimento em poucos anos. Dá para "
                "financiar com parcelas que cabem no valor que você já paga hoje."
            )
        else:
            t.updates["solution"] = "residencial"
            monthly = value * Decimal("0.9")
            t.say(
                f"{who}om uma conta de {brl(value)}, um sistema fotovoltaico no telhado da {where} "
                f"pode reduzir a conta em até 90%: uma economia de cerca de {brl(monthly)} por mês, "
                f"ou {brl(monthly * 12)} por ano. E dá para financiar com parcelas que cabem no valor "
                "que você já paga hoje."
            )
        invite = " Se fizer sentido, chame também quem decide com você." if shared else ""
        self._to(
            t,
            "offer_meeting",
            "Posso agendar uma conversa de 20 minutos com um dos nossos consultores para te mostrar "
            f"a proposta? Qual dia e horário ficam melhores para você?{invite}",
        )

    def _offer_meeting(self, t: _Turn) -> None:
        f = fold(t.text)
        if WHEN.search(f) or (YES.search(f) and not NO.search(f)):
            when = f" ({t.text.strip()[:80]})" if WHEN.search(f) else ""
            meeting = parse_meeting(t.text, self.clock(), self.hours) if self.hours else None
            if meeting is not None:  # a day and an hour: reminders can be planned for it
                t.updates["meeting_at"] = meeting
            self._to(
                t,
                "booked",
                f"Combinado{', ' + t.name if t.name else ''}! Anotei sua preferência{when}. Um "
                f"consultor da {self.company} vai te chamar aqui no WhatsApp para confirmar o "
                "horário. Obrigada! ☀️",
            )
        elif NO.search(f):
            self._to(
                t,
                "nurture",
                "Sem problemas! Fico à disposição: quando quiser conversar sobre a sua economia "
                "com energia solar, é só me chamar por aqui.",
            )
        elif t.answered:
            t.say("Quer que eu agende uma conversa rápida com um consultor? Qual dia e horário ficam bons?")
        else:
            t.say(
                "Posso agendar uma conversa de 20 minutos com um consultor? Qual dia e horário ficam melhores para você?"
            )

    def _after(self, t: _Turn) -> None:  # booked, nurture
        if t.answered:
            return
        if t.lead.get("stage") == "nurture" and YES.search(fold(t.text)):
            self._to(
                t,
                "offer_meeting",
                "Que ótimo! Qual dia e horário ficam melhores para uma conversa de 20 minutos com um consultor?",
            )
        else:
            t.say(f"Qualquer dúvida é só me chamar por aqui{', ' + t.name if t.name else ''}! ☀️")

    @staticmethod
    def _to(t: _Turn, stage: str, text: str) -> None:
        t.updates["stage"] = stage
        t.say(text)


BILL_QUESTION = (
    "Para eu calcular quanto você pode economizar, me conta: quanto vem, em média, a sua conta de luz por mês?"
)
