"""Photos and voice notes through the real pipeline: webhook -> buffer -> media -> agent ->
reply, with real Pillow, Tesseract and ffmpeg, and fakes (real HTTP) for the Evolution API
and the transcription service."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from PIL import Image

from daemon.cache import TwoTierCache
from daemon.embedded import Endpoints
from daemon.evolution import media_event
from daemon.media.processor import MediaProcessor
from daemon.metrics import Metrics
from daemon.models import PendingMessage
from daemon.testing.fake_openai import run_fake_openai
from tests.bills import bill_image
from tests.helpers import (
    event,
    fetch,
    make_config,
    metric,
    run_daemon,
    run_fake_evolution,
    start_serve,
    wait_for,
)
from tests.voice import voice_note

PHONE = "5511966665555"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def post(url: str, *events: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for e in events:
            resp = await http.post("/webhook/evolution", json=e)
            assert resp.status_code == 200, resp.text


async def replies(endpoints: Endpoints, phone: str = PHONE, count: int = 1) -> list[str]:
    async def check() -> list[str] | None:
        rows = await fetch(endpoints.database_url, "SELECT body FROM outbox WHERE phone_number = $1 ORDER BY id", phone)
        return [r["body"] for r in rows] if len(rows) >= count else None

    return await wait_for(check, timeout=30)


def image(
    phone: str, data: bytes | None, message_id: str, *, caption: str = "", ts: float | None = None
) -> dict[str, Any]:
    return media_event(
        phone,
        "image",
        message_id=message_id,
        instance="sdr",
        caption=caption,
        b64=b64(data) if data is not None else None,
        mimetype="image/jpeg",
        timestamp=ts,
    )


async def test_a_burst_with_text_and_a_bill_photo_is_one_turn_that_uses_both(clean: Endpoints) -> None:
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        now = datetime.now(UTC).timestamp()
        await post(
            d.url,
            event(PHONE, "Oi, meu nome é Ana", timestamp=now),
            image(PHONE, bill_image(amount="487,35", kwh=352), "IMG1", ts=now + 1),
        )
        [reply] = await replies(clean)
        [turn] = await fetch(clean.database_url, "SELECT * FROM turns")
        [lead] = await fetch(clean.database_url, "SELECT * FROM leads")
    assert "Ana" in reply and "Vi aqui que sua conta veio R$ 487,35 (352 kWh), certo?" in reply
    assert turn["messages_joined"] == 2 and "media" in turn["stages"]
    assert lead["bill_value"] == Decimal("487.35") and lead["consumption_kwh"] == 352
    assert lead["name"] == "Ana" and lead["stage"] == "confirm_bill"


async def test_the_photo_comes_from_the_evolution_api_when_the_event_has_no_base64(clean: Endpoints) -> None:
    async with run_fake_evolution() as fake:
        fake.media["IMG2"] = (b64(bill_image(amount="1.234,56", kwh=980, distributor="ENEL")), "image/jpeg")
        cfg = make_config(clean, SDR_EVOLUTION_BASE_URL=fake.url)
        async with run_daemon(cfg) as d:
            await post(d.url, image(PHONE, None, "IMG2"))
            await wait_for(lambda: asyncio.sleep(0, fake.sent), timeout=30)
    [request] = fake.media_requests
    assert request["message"]["key"]["id"] == "IMG2" and request["instance"] == "sdr"
    assert "R$ 1.234,56 (980 kWh)" in fake.sent[0]["text"]


async def test_the_same_photo_twice_is_analysed_once(clean: Endpoints) -> None:
    photo = bill_image(amount="312,90", kwh=240)
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        await post(d.url, image(PHONE, photo, "IMG3"))
        await replies(clean)
        other = "5511955554444"
        await post(d.url, image(other, photo, "IMG4"))
        [reply] = await replies(clean, other)
        async with httpx.AsyncClient(base_url=d.url) as http:
            text = (await http.get("/metrics")).text
    assert "R$ 312,90" in reply
    assert metric(text, "sdr_media_total", kind="image", outcome="ok") == 2
    assert metric(text, "sdr_cache_misses_total", cache="media") == 1  # one analysis
    assert metric(text, "sdr_cache_hits_total", cache="media", tier="local") == 1


async def test_a_broken_photo_gets_a_graceful_answer_and_the_text_is_still_answered(clean: Endpoints) -> None:
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        now = datetime.now(UTC).timestamp()
        await post(
            d.url,
            event(PHONE, "Oi, meu nome é Bruno", timestamp=now),
            image(PHONE, b"this is a text file named conta.jpg", "IMG5", ts=now + 1),
        )
        [reply] = await replies(clean)
        async with httpx.AsyncClient(base_url=d.url) as http:
            text = (await http.get("/metrics")).text
    assert "Não consegui abrir essa imagem" in reply and "Bruno" in reply
    assert metric(text, "sdr_media_total", kind="image", outcome="refused") == 1


async def test_a_media_timeout_never_blocks_the_text_and_is_on_the_turn_record(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_TIMEOUTS_IMAGE_PROCESSING="0.001")
    async with run_daemon(cfg) as d:
        now = datetime.now(UTC).timestamp()
        await post(
            d.url,
            event(PHONE, "Meu nome é Carla", timestamp=now),
            image(PHONE, bill_image(size=(2480, 3508)), "IMG6", ts=now + 1),
        )
        [reply] = await replies(clean)
        [turn] = await fetch(clean.database_url, "SELECT * FROM turns")
    assert "Carla" in reply and turn["outcome"] == "ok"
    assert "media" in turn["failures"]


async def test_a_voice_note_is_transcribed_and_joins_the_burst(clean: Endpoints) -> None:
    async with run_fake_openai() as llm:
        llm.transcript = "Oi, meu nome é Daniel"
        cfg = make_config(clean, SDR_AGENT_TRANSCRIPTION_URL=llm.url)
        async with run_daemon(cfg) as d:
            note = voice_note(10)
            await post(
                d.url,
                media_event(
                    PHONE,
                    "audio",
                    message_id="AUD1",
                    instance="sdr",
                    b64=b64(note),
                    mimetype="audio/ogg; codecs=opus",
                    seconds=10,
                ),
            )
            [reply] = await replies(clean)
    [sent] = llm.transcriptions
    assert sent["model"] == "whisper-1" and sent["language"] == "pt"
    assert sent["file_bytes"][:4] == b"RIFF"
    assert "Daniel" in reply


async def test_a_long_voice_note_gets_a_polite_answer(clean: Endpoints) -> None:
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        note = voice_note(180)
        await post(
            d.url,
            media_event(
                PHONE,
                "audio",
                message_id="AUD2",
                instance="sdr",
                b64=b64(note),
                mimetype="audio/ogg; codecs=opus",
                seconds=180,
            ),
        )
        [reply] = await replies(clean)
    assert "Seu áudio ficou um pouco longo" in reply


async def test_twenty_photos_at_once_never_stall_the_event_loop(clean: Endpoints) -> None:
    """Decoding and resizing run in worker processes, OCR in subprocesses: a probe that
    wakes every 5 ms keeps waking while the photos are being prepared."""
    # The event loop's share, without OCR's CPU; and no time budget: twenty photos queue for
    # two workers, and on a loaded machine the last ones would spend it waiting (the budget
    # has its own test above).
    cfg = make_config(clean, SDR_MEDIA_OCR="false", SDR_TIMEOUTS_IMAGE_PROCESSING="0")
    page = Image.open(io.BytesIO(bill_image(size=(2480, 3508))))  # a 300 dpi scan's size
    photos = []
    for quality in range(76, 96):  # 20 different files (20 cache keys) of one page
        buf = io.BytesIO()
        page.save(buf, "JPEG", quality=quality)
        photos.append(buf.getvalue())
    metrics = Metrics()
    redis = aioredis.Redis.from_url(clean.redis_url)
    cache: TwoTierCache[dict[str, Any]] = TwoTierCache(
        "media", redis, dict[str, Any], ttl=60, local_ttl=60, size=100, enabled=True, metrics=metrics
    )
    proc = MediaProcessor(cfg, None, cache, metrics)
    lags: list[float] = []
    done = asyncio.Event()
    in_pool = 0  # photos handed to the worker pool, not back yet
    ticks_meanwhile = 0
    to_pool = proc._cpu

    async def counted(fn: Any, *args: Any) -> Any:
        nonlocal in_pool
        in_pool += 1
        try:
            return await to_pool(fn, *args)
        finally:
            in_pool -= 1

    proc._cpu = counted  # type: ignore[method-assign]

    async def probe() -> None:
        nonlocal ticks_meanwhile
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - start - 0.005)
            ticks_meanwhile += in_pool > 0

    now = datetime.now(UTC)
    messages = [
        PendingMessage(i, 1, 1, "image", "", now, now, {"base64": b64(p), "mimetype": "image/jpeg"})
        for i, p in enumerate(photos)
    ]
    task = asyncio.create_task(probe())
    try:
        results = await asyncio.gather(*(proc.analyse(m) for m in messages))
    finally:
        done.set()
        await task
        await proc.close()
        await redis.aclose()
    assert [r.outcome for r in results] == ["unavailable"] * 20  # prepared; OCR off
    assert all(r.jpeg is not None for r in results)
    # The loop ran while the photos were decoded elsewhere (on the loop, it could not have).
    assert ticks_meanwhile >= 10, ticks_meanwhile
    # Processes, because from threads decoding stalled the loop for 60-140 ms (measured,
    # see MediaProcessor); idle, the worst lag here is ~10 ms. A loaded shared machine
    # deschedules the loop for tens of ms by itself: only a gross stall is a failure.
    assert isinstance(proc.pool, ProcessPoolExecutor)
    assert max(lags) < 0.5, f"worst event-loop lag {max(lags) * 1000:.1f} ms"


async def test_without_ocr_the_photo_still_works_and_the_agent_asks_for_the_value(clean: Endpoints) -> None:
    cfg = make_config(clean, SDR_MEDIA_OCR="false")
    async with run_daemon(cfg) as d:
        await post(d.url, image(PHONE, bill_image(), "IMG7"))
        [reply] = await replies(clean)
        [lead] = await fetch(clean.database_url, "SELECT * FROM leads")
    assert "Recebi a foto" in reply and "quanto veio a sua conta de luz" in reply
    assert lead["stage"] == "ask_bill" and lead["bill_value"] is None


async def test_the_lead_confirms_the_value_read_from_the_bill(clean: Endpoints) -> None:
    cfg = make_config(clean)
    async with run_daemon(cfg) as d:
        await post(d.url, image(PHONE, bill_image(amount="487,35", kwh=352), "IMG8"))
        await replies(clean)
        await post(d.url, event(PHONE, "Sim, isso mesmo"))
        second = (await replies(clean, count=2))[1]
        [lead] = await fetch(clean.database_url, "SELECT * FROM leads")
    assert "Anotado: conta de R$ 487,35 por mês" in second
    assert lead["stage"] == "ask_property" and lead["bill_value"] == Decimal("487.35")


async def test_the_openai_backend_sends_the_prepared_photo_to_a_vision_model(clean: Endpoints) -> None:
    async with run_fake_openai() as llm:
        llm.content = "Vi sua conta de R$ 487,35, certo?"
        cfg = make_config(
            clean, SDR_AGENT_BACKEND="openai", SDR_AGENT_BASE_URL=llm.url, SDR_AGENT_VISION_MODEL="gpt-4o"
        )
        async with run_daemon(cfg) as d:
            await post(
                d.url,
                image(PHONE, bill_image(amount="487,35", kwh=352, size=(2480, 3508)), "IMG9", caption="segue a conta"),
            )
            await replies(clean)
    [request] = llm.requests
    body = request["body"]
    user = body["messages"][-1]["content"]
    assert body["model"] == "gpt-4o"
    text, photo = user[0]["text"], user[1]["image_url"]["url"]
    assert "segue a conta" in text and "valor a pagar R$ 487,35, consumo 352 kWh" in text
    assert photo.startswith("data:image/jpeg;base64,")
    prepared = Image.open(io.BytesIO(base64.b64decode(photo.split(",", 1)[1])))
    assert prepared.format == "JPEG" and max(prepared.size) == 1920  # downscaled from 3508


async def test_serve_with_media_workers_stops_cleanly_on_ctrl_c(clean: Endpoints, tmp_path: Path) -> None:
    """`python -m sdrctl serve` spawns media worker processes; Ctrl-C reaches the whole
    process group, and only the daemon may decide when they stop."""
    env = {"SDR_DATABASE_URL": clean.database_url, "SDR_REDIS_URL": clean.redis_url}
    serve = await start_serve(env, tmp_path / "serve.log", own_group=True)
    try:
        await serve.wait_ready()
        await post(serve.url, image(PHONE, bill_image(amount="222,22"), "IMG10"))
        [reply] = await replies(clean)
        workers = _children(serve.proc.pid)
        os.killpg(serve.proc.pid, signal.SIGINT)
        code = await asyncio.wait_for(serve.proc.wait(), timeout=60)
    finally:
        if serve.proc.returncode is None:
            serve.proc.kill()
            await serve.proc.wait()
    assert "R$ 222,22" in reply
    assert len(workers) >= 1  # the media worker processes existed...
    assert code == 0 and "Traceback" not in serve.log, serve.log
    # ...and are gone (multiprocessing's resource tracker leaves when its pipe closes).
    await wait_for(lambda: asyncio.sleep(0, not [pid for pid in workers if _alive(pid)]), timeout=10)


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
