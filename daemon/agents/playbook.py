"""The `playbook` backend: a deterministic pt-BR SDR qualification flow that runs offline.

Stages: new -> ask_name -> ask_bill -> ask_property -> ask_decision -> offer_meeting ->
booked (or nurture). Questions at any stage are answered from the knowledge base first,
then the flow goes on."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from daemon.agents import AgentReply, TurnInput
from daemon.agents.tools import Refused, ToolBox
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
DAYS_HOURS = (
    r"hoje|amanha|segunda|terca|quarta|quinta|sexta|sabado|domingo"
    r"|\d{1,2}\s*(?:h\d{2}|h|hs|horas|:\d{2})|\d{1,2}/\d{1,2}"
)
WHEN = re.compile(rf"\b({DAYS_HOURS}|manha|tarde|noite)\b")
# Said with another answer, only a day or an hour is a meeting time: in "boa tarde! sou eu",
# "tarde" is a greeting.
DAY_OR_HOUR = re.compile(rf"\b({DAYS_HOURS})\b")
# Where a message's clauses end: "sou eu que decido, pode ser sexta às 15h" quotes the second.
CLAUSES = re.compile(r"\n|[,;!?]|\.(?=\s|$)")
# The words around a day and an hour when a lead offers them, "?" or not: "pode ser sexta
# às 15h?" answers "Qual dia e horário?", it asks the knowledge base nothing.
PROPOSAL_WORDS = frozenset(
    "pode ser que tal o acha fica ficaria bom boa melhor seria serve da pra para voce vc voces sim ok "
    "entao na no a as ao aos dia de do feira umas por volta das depois antes partir ou e mais menos "
    "pela pelas meio proxima proximo essa esta nessa nesta semana".split()
)


def is_question(text: str) -> bool:
    """A question for the knowledge base ("tudo bem?" is a greeting, not one, and "pode ser
    sexta às 15h?" a meeting time)."""
    asked = "".join(c for c in re.split(r"(?<=[,;!?\n])", text) if not is_proposal(c)).strip()
    f = fold(asked)
    return bool(f) and ("?" in f or f.startswith(QUESTION_STARTS)) and not is_greeting(asked)


def is_proposal(text: str) -> bool:
    """A day or an hour offered, and nothing else: "pode ser sexta às 15h?", "que tal amanhã?"."""
    f = fold(text)
    rest = re.findall(r"[a-z]+", WHEN.sub(" ", f))
    return bool(DAY_OR_HOUR.search(f)) and all(w in PROPOSAL_WORDS for w in rest)


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
WITH_OTHERS = (
    r"esposa|marido|mulher|conjuge|socio|socia|socios|familia|pai|mae|filho|filha|sogr[oa]|"
    r"irma|irmao|namorad[oa]|nos dois|a gente|junto|juntos"
)
OTHERS = re.compile(rf"\b({WITH_OTHERS}|tambem)\b")
MYSELF = re.compile(r"\b(sou eu|so eu|eu mesm[oa]|eu decido|minha|sim|sou|eu)\b")
# Who decides, when the lead says it unasked ("uns 600 reais, e eu que decido"): explicit
# statements only, since no question frames them ("sou eu" alone is read in ask_decision;
# "também" alone is not someone else: "eu decido, e também queria saber...").
DECIDING = re.compile(r"\b(decid\w*|decisao|ver com|falar com|conversar com|consultar)\b")
SHARED = re.compile(rf"\b({WITH_OTHERS})\b")
WE_DECIDE = re.compile(r"\b(decidimos|decidem|nao (?:sou eu|e (?:so )?(?:eu|minha)|decido))\b")
I_DECIDE = re.compile(
    r"\b((?:sou |so )?eu (?:mesm[oa] |so )?(?:que |quem )?decid[oe]\w*"
    r"|quem decide(?: aqui| em casa)? sou eu"
    r"|decisao(?: aqui)? (?:e|eh|fica) (?:so )?minha"
    r"|decido sozinh[oa])\b"
)
PROPERTY_LABEL = {
    "casa": "sua casa",
    "apartamento": "seu apartamento",
    "comercial": "sua empresa",
    "rural": "sua propriedade rural",
}


def stated_decision(text: str) -> str | None:
    """Who decides ("lead" or "compartilhada") when the text says it, else None."""
    f = fold(text)
    if WE_DECIDE.search(f) or (DECIDING.search(f) and SHARED.search(f)):
        return "compartilhada"
    return "lead" if I_DECIDE.search(f) else None


def preference(text: str) -> str:
    """The clauses of the text that say when: what the booking repeats back."""
    said = [c.strip() for c in CLAUSES.split(text) if WHEN.search(fold(c))]
    return ", ".join(c for c in said if c)[:80] or text.strip()[:80]


def extract_property(text: str) -> str | None:
    f = fold(text) + " "
    for kind, words in PROPERTY_WORDS:
        if any(w in f for w in words):
            return kind
    return None


class _Turn:
    """What one reply is being built from, and what it learns."""

    def __init__(self, lead: dict[str, Any], text: str, tools: ToolBox | None = None) -> None:
        self.lead = lead
        self.text = text
        self.tools = tools  # the rules a meeting must keep, shared with the openai backend
        self.parts: list[str] = []
        self.updates: dict[str, Any] = {}
        self.answered = False  # a question was answered from the knowledge base

    @property
    def name(self) -> str | None:
        return self.updates.get("name") or self.lead.get("name")

    @property
    def decision_maker(self) -> str | None:
        return self.updates.get("decision_maker") or self.lead.get("decision_maker")

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
        t = _Turn(turn.lead, "\n".join(x for x in turn.texts if x.strip()), turn.tools)
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
        decision = stated_decision(t.text)
        if decision is not None:  # at any stage: the question is not asked again
            t.updates["decision_maker"] = decision
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
        if t.decision_maker is not None:  # said earlier ("eu que decido"): not asked again
            self._present(t)
            return
        self._to(
            t,
            "ask_decision",
            "Perfeito! E a decisão sobre a energia aí é só sua, ou tem mais alguém envolvido "
            "(cônjuge, sócio, família)?",
        )

    def _ask_decision(self, t: _Turn) -> None:
        f = fold(t.text)
        told = bool(OTHERS.search(f) or MYSELF.search(f))
        when = self._says_when(t)
        if t.answered and not told and not when:
            t.say("E a decisão sobre a energia é só sua, ou tem mais alguém envolvido?")
            return
        # We just asked, so any answer is read as one ("sim", "só eu"), except a bare day
        # and hour ("pode ser sexta às 15h"): that says when, not who decides.
        if "decision_maker" not in t.updates and (told or not when):
            t.updates["decision_maker"] = "compartilhada" if OTHERS.search(f) else "lead"
        self._present(t)

    def _present(self, t: _Turn) -> None:
        """The solution, then the meeting: booked at once when the burst already says when
        ("sou eu que decido" + "pode ser sexta às 15h"), else offered."""
        self._solution(t)
        if self._says_when(t):
            self._book(t)
            return
        invite = " Se fizer sentido, chame também quem decide com você." if t.decision_maker == "compartilhada" else ""
        self._to(
            t,
            "offer_meeting",
            "Posso agendar uma conversa de 20 minutos com um dos nossos consultores para te mostrar "
            f"a proposta? Qual dia e horário ficam melhores para você?{invite}",
        )

    def _solution(self, t: _Turn) -> None:
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

    def _offer_meeting(self, t: _Turn) -> None:
        f = fold(t.text)
        if WHEN.search(f) or (YES.search(f) and not NO.search(f)):
            self._book(t)
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

    def _says_when(self, t: _Turn) -> bool:
        """Whether a burst answering something else also says when to meet: a day and an
        hour, or a day or an hour not turned down ("sou eu, mas hoje não dá" is no time),
        and never just a part of the day ("boa tarde")."""
        f = fold(t.text)
        return self._meeting_at(t.text) is not None or bool(DAY_OR_HOUR.search(f) and not NO.search(f))

    def _meeting_at(self, text: str) -> datetime | None:
        return parse_meeting(text, self.clock(), self.hours) if self.hours else None

    def _book(self, t: _Turn) -> None:
        when = f" ({preference(t.text)})" if WHEN.search(fold(t.text)) else ""
        meeting = self._meeting_at(t.text)
        if meeting is not None and t.tools is not None:
            try:  # book_meeting's rules: in business hours, an hour ahead at least, within 60 days
                t.tools.meeting(meeting)
            except Refused:  # a preference the consultant confirms, with no reminders for it
                meeting = None
        if meeting is not None:  # a day and an hour: reminders can be planned for it
            t.updates["meeting_at"] = meeting
        self._to(
            t,
            "booked",
            f"Combinado{', ' + t.name if t.name else ''}! Anotei sua preferência{when}. Um "
            f"consultor da {self.company} vai te chamar aqui no WhatsApp para confirmar o "
            "horário. Obrigada! ☀️",
        )

    def _after(self, t: _Turn) -> None:  # booked, nurture
        if t.answered:
            return
        if t.lead.get("stage") == "nurture" and self._says_when(t):  # back with a day and an hour
            self._book(t)
        elif t.lead.get("stage") == "nurture" and YES.search(fold(t.text)):
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
