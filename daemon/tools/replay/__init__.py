"""`sdrctl replay` and `sdrctl export`: recorded conversations as JSONL, re-sent through the
real pipeline, and the new replies compared with the recorded ones, burst by burst.

- recording.py: the replay format (reading, checking, writing a line);
- replayer.py: running a replay against a daemon and reading its replies;
- results.py: what a replay found, turn by turn;
- export.py: the database's conversations as recordings (`sdrctl export`, `--from-db`)."""

from __future__ import annotations

from daemon.tools.replay.export import from_database, parse_since, pseudonym
from daemon.tools.replay.recording import Conversation, Line, dumps_line, parse_file, parse_lines, select
from daemon.tools.replay.replayer import check_speed, replay
from daemon.tools.replay.results import ConversationResult, ReplayReport, TurnResult

__all__ = [
    "Conversation",
    "ConversationResult",
    "Line",
    "ReplayReport",
    "TurnResult",
    "check_speed",
    "dumps_line",
    "from_database",
    "parse_file",
    "parse_lines",
    "parse_since",
    "pseudonym",
    "replay",
    "select",
]
