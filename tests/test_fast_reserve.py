"""Reserves answered from memory and written in batches (ledger/daemon/fastpath.py), on each
database: the answers are the holds the ledger then has; the database stays the authority
(every refusal is its own; a hold it cannot write does not exist, and nothing overdraws);
other operations see every answered hold; a daemon killed with answers unwritten leaves a
sound ledger, and PrologSlurmctld reserves for such a job or cancels it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger.daemon.auth import Peer, Policy
from ledger.daemon.fastpath import FastReserve
from ledger.daemon.handlers import Handlers
from ledger.errors import IdempotencyConflict, Reason, Refusal
from ledger.views import HoldRequest

SLURM = Peer(1, 64030, 64030, "slurm", True)
H = 3600


def req(seconds=600, gpus=1, gpu_type="h100"):
    return HoldRequest(gpus=gpus, seconds=seconds, gpu_type=gpu_type, user="alice")


def fields(token, seconds=600, key=None, **kw):
    out = {"op": "reserve", "token": token, "gpus": "1", "seconds": str(seconds),
           "type": "h100", "user": "alice", **kw}
    if key:
        out["key"] = key
    return out


@pytest.fixture
def fast(ledger):
    """A FastReserve whose writer is driven by the test (no thread): deterministic."""
    f = FastReserve(ledger, fresh_s=60)
    f._refresh(force=True)
    return f


def warm(f, token_id):
    f.learn(token_id)
    f._refresh()


def test_answers_from_memory_are_the_holds_the_ledger_then_has(ledger, fast):
    token, view = ledger.mint("physics", 10 * H)
    assert fast.answer(token, req(), None) is None  # cold: the synchronous path decides
    warm(fast, view.id)
    answers = [fast.answer(token, req(seconds=600 + i), f"k{i}") for i in range(5)]
    assert all(a is not None for a in answers) and fast.answered == 5
    assert ledger.holds(token_id=view.id) == []  # nothing written yet
    fast._write_batch()
    assert (fast.written, fast.lost) == (5, 0)
    held = {h.id: h.amount for h in ledger.holds(token_id=view.id)}
    assert held == {a["hold"]: a["amount"] for a in answers}
    assert [a["amount"] for a in answers] == [600, 601, 602, 603, 604]
    assert ledger.inspect(view.id).remaining == 10 * H - sum(held.values())
    assert ledger.verify_journal().ok


def test_memory_never_answers_beyond_the_balance_and_refusals_are_the_ledgers(ledger, fast):
    token, view = ledger.mint("physics", 3000)
    warm(fast, view.id)
    answered = [fast.answer(token, req(), None) for _ in range(6)]
    assert [a is not None for a in answered] == [True] * 5 + [False]
    h = Handlers(ledger, Policy("slurm"), accounts=lambda u: frozenset(), fast=fast)
    fast.flush = lambda timeout=5.0: (fast._write_batch(), True)[1] if fast._queue else True
    resp = h.handle(SLURM, fields(token))  # synchronous: writes the queue, then refuses
    assert (resp["ok"], resp["reason"]) == (0, "insufficient")
    assert f"token {view.id} has 0.000 GPU-h left" in resp["message"]
    assert len(ledger.holds(token_id=view.id)) == 5 and ledger.verify_journal().ok


def test_after_a_write_memory_answers_up_to_what_is_left_without_reading_it_back(ledger, fast):
    """A written batch is taken off the remembered balance (no read after each batch):
    the answers go on exactly to the balance the database then has; a hold that could not
    be written makes its token read again before memory answers for it."""
    token, view = ledger.mint("physics", 3000)
    warm(fast, view.id)
    reads = []
    budgets = fast.writer.budgets
    fast.writer.budgets = lambda ids: (reads.append(ids), budgets(ids))[1]
    assert all(fast.answer(token, req(), None) for _ in range(2))
    fast._write_batch()
    assert reads == [] and fast._budgets[view.id].balance == ledger.inspect(view.id).remaining
    assert [fast.answer(token, req(), None) is not None for _ in range(4)] == [True] * 3 + [False]
    ledger.split(token, 1200, account="physics")  # spent elsewhere: two answers cannot be written
    fast._write_batch()
    assert (fast.written, fast.lost) == (3, 2)
    assert fast.answer(token, req(), None) is None  # stale: the database decides, then reads
    fast._refresh()
    assert reads == [[view.id]] and fast._budgets[view.id].balance == 0
    assert ledger.inspect(view.id).remaining == 0 and ledger.verify_journal().ok


def test_a_hold_spent_elsewhere_before_its_write_does_not_exist_and_nothing_overdraws(
        ledger, fast):
    token, view = ledger.mint("physics", H)
    warm(fast, view.id)
    first = fast.answer(token, req(seconds=H), "submit-1")
    assert first is not None
    ledger.split(token, H, account="physics")  # the admin moves the whole balance away
    fast._write_batch()
    assert (fast.written, fast.lost) == (0, 1)
    with pytest.raises(Exception, match="unknown hold"):
        ledger.hold(first["hold"])
    assert ledger.inspect(view.id).remaining == 0 and ledger.verify_journal().ok


def test_answers_stop_when_the_writer_falls_behind(ledger):
    f = FastReserve(ledger, fresh_s=60, max_backlog=3)
    f._refresh(force=True)
    token, view = ledger.mint("physics", 10 * H)
    warm(f, view.id)
    assert [f.answer(token, req(), None) is not None for _ in range(4)] == [True] * 3 + [False]
    f._write_batch()
    assert f.answer(token, req(), None) is not None and f.written == 3


def test_a_replayed_key_gets_its_answer_before_and_after_the_write(ledger, fast):
    token, view = ledger.mint("physics", H)
    warm(fast, view.id)
    a = fast.answer(token, req(), "job-key-7")
    assert fast.answer(token, req(), "job-key-7") == a
    fast._write_batch()
    assert fast.answer(token, req(), "job-key-7") == a
    assert ledger.reserve(token, req(), "job-key-7").id == a["hold"]  # the ledger agrees
    assert len(ledger.holds(token_id=view.id)) == 1
    # the same key for another request is not a replay: the ledger says so
    assert fast.answer(token, req(seconds=1200), "job-key-7") is None
    with pytest.raises(IdempotencyConflict):
        ledger.reserve(token, req(seconds=1200), "job-key-7")


def test_a_forged_or_expired_token_is_refused_at_once(ledger, fast):
    token, view = ledger.mint("physics", H)
    warm(fast, view.id)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Refusal) as exc:
        fast.answer(forged, req(), None)
    assert exc.value.reason == Reason.BAD_SIGNATURE
    ledger.revoke(token, "leaked")
    fast._refresh()
    assert fast.answer(token, req(), None) is None  # revoked: the ledger says it


def test_every_other_operation_waits_for_the_answers_to_be_written(ledger):
    fast = FastReserve(ledger, fresh_s=60, delay_s=0.05)
    fast.start()
    try:
        token, view = ledger.mint("physics", H)
        h = Handlers(ledger, Policy("slurm"), accounts=lambda u: frozenset(), fast=fast)
        assert h.handle(SLURM, fields(token))["ok"] == 1  # synchronous, then learned
        deadline = time.monotonic() + 5
        while fast.answer(token, req(), None) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        resp = h.handle(SLURM, fields(token, key="k-fast"))
        assert resp["ok"] == 1 and fast.answered >= 2
        void = h.handle(SLURM, {"op": "void", "hold": resp["hold"], "reason": "test"})
        assert void["ok"] == 1 and void["state"] == "voided", void
    finally:
        fast.stop()
    assert ledger.verify_journal().ok


# -- a daemon killed with answers unwritten -----------------------------------------------------


def _request(path: Path, line: str) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return dict(p.split("=", 1) for p in data.decode().split())


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:  # a thread may end while we look
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and
                   "multiprocessing" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                   for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_the_writer_process_writes_the_answers_and_is_replaced_when_it_dies(db_url, tmp_path):
    """The daemon's writer in a process of its own: the answers are written through it; a
    writer killed with SIGKILL is found out at the next call, the batch is retried in a new
    writer and written once."""
    from conftest import seeded

    from ledger.daemon.writer import ProcessWriter

    lg = seeded(db_url, tmp_path / "keys")
    token, view = lg.mint("physics", 100 * H)
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "{db_url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n')
    writer = ProcessWriter(cfg)
    f = FastReserve(lg, fresh_s=60, writer=writer)
    writer.start()
    try:
        f._refresh(force=True)
        warm(f, view.id)
        first = [f.answer(token, req(), f"w{i}") for i in range(3)]
        f._write_batch()
        assert {h.id for h in lg.holds(token_id=view.id)} == {a["hold"] for a in first}
        writer._proc.kill()
        writer._proc.join(10)
        second = [f.answer(token, req(), f"x{i}") for i in range(2)]
        assert all(second)
        f._write_batch()  # the call finds the writer dead and starts another first
        held = {h.id for h in lg.holds(token_id=view.id)}
        assert held == {a["hold"] for a in first + second}
        assert (f.written, f.lost) == (5, 0)
        assert lg.inspect(view.id).held == 5 * 600 and lg.verify_journal().ok
    finally:
        f.stop()
    assert writer._proc is None
    lg.engine.dispose()


def test_kill_9_mid_stream_loses_no_money_and_overdraws_nothing(db_url, tmp_path):
    """`gpuledger serve` with fast_reserve: reserves stream in, the daemon is killed with
    SIGKILL mid-stream. Every hold the ledger has was answered; the token's balance plus
    what it holds is what it was minted; `verify` passes; the answered holds that were
    never written are what PrologSlurmctld re-reserves or cancels."""
    from conftest import seeded

    gl = str(Path(sys.executable).parent / "gpuledger")
    lg = seeded(db_url, tmp_path / "keys")
    token, view = lg.mint("physics", 4000 * 600)
    cfg = tmp_path / "gpuledger.toml"
    sock = tmp_path / "run" / "gl.sock"
    sock.parent.mkdir()
    cfg.write_text(f'[database]\nurl = "{db_url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n'
                   f'[daemon]\nsocket = "{sock}"\nslurm_user = "root"\nfast_reserve = true\n')
    proc = subprocess.Popen([gl, "--config", str(cfg), "serve"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.log", "w"))
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        answered: list[str] = []
        killed_at = None
        for i in range(3000):
            r = _request(sock, f"op=reserve token={token} gpus=1 seconds=600 type=h100 "
                               f"user=alice key=kill-{i}")
            assert r.get("ok") == "1", r
            answered.append(r["hold"])
            if i == 400:
                writers = _children(proc.pid)
                proc.send_signal(signal.SIGKILL)
                killed_at = i
                break
        proc.wait(10)
        # the writer process sees its pipe close, ends its batch (committed or not) and exits
        assert writers and _gone(writers, 20), writers
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at == 400
    written = {h.id for h in lg.holds(token_id=view.id)}
    assert written <= set(answered)
    t = lg.inspect(view.id)
    assert t.remaining + t.held == 4000 * 600 and t.held == 600 * len(written)
    assert lg.verify_journal().ok
    lost = [h for h in answered if h not in written]
    print(f"answered {len(answered)}, written {len(written)}, lost at the kill {len(lost)}")
    lg.engine.dispose()


def test_the_writer_process_finds_the_default_config_as_the_daemon_does(tmp_path, monkeypatch):
    """`gpuledger serve` without --config (the systemd unit sets GPULEDGER_CONFIG): the
    writer process reads the same file."""
    from conftest import seeded

    from ledger.config import ENV_VAR
    from ledger.daemon.writer import ProcessWriter, WriterError

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    seeded(url, tmp_path / "keys").engine.dispose()
    cfg = tmp_path / "gpuledger.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n')
    monkeypatch.setenv(ENV_VAR, str(cfg))
    writer = ProcessWriter(None)
    writer.start()
    try:
        rates, _tiers = writer.prices()
        assert rates["h100"] == 1_000_000
    finally:
        writer.close()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.toml"))
    with pytest.raises(WriterError, match="no configuration at .*missing.toml"):
        ProcessWriter(None).start()


def test_several_daemons_sharing_one_ledger_never_overdraw(db_url, tmp_path):
    """Two daemons with fast_reserve over one database, each with its writer running, take
    reserves from two threads each: on one hot token both answer for, and on a token of
    their own. Memory may answer more than a token holds (each daemon knows only its own
    answers); the database writes no more than it holds, every hold written was answered,
    every token's balance plus what it holds is what it was minted, and verify passes."""
    import threading

    from conftest import make_ledger, seeded

    keys = tmp_path / "keys"
    lg = seeded(db_url, keys)
    hot, hot_view = lg.mint("physics", 40 * 600)
    own = [lg.mint("physics", 10 * 600) for _ in range(2)]
    daemons = []
    for _ in range(2):
        ledger = make_ledger(db_url, keys)
        fast = FastReserve(ledger, fresh_s=0.5, delay_s=0.002)
        fast.start()
        daemons.append((fast, Handlers(ledger, Policy("slurm"), accounts=lambda u: frozenset(),
                                       fast=fast)))
    answered: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def submit(handlers, token, n, tag):
        for i in range(n):
            r = handlers.handle(SLURM, fields(token, key=f"{tag}-{i}"))
            with lock:
                if r["ok"] == 1:
                    answered.append(r["hold"])
                else:
                    assert r["reason"] in ("insufficient", "exhausted"), r
                    refused.append(r["reason"])

    threads = [threading.Thread(target=submit, args=(h, token, n, f"d{d}-{tag}"))
               for d, (_, h) in enumerate(daemons)
               for token, n, tag in ((hot, 60, "hot"), (own[d][0], 15, "own"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for fast, _ in daemons:
        fast.stop()
        fast.ledger.engine.dispose()
    written = {h.id: h for h in lg.holds()}
    assert set(written) <= set(answered) and len(set(answered)) == len(answered)
    for token_id, minted in [(hot_view.id, 40 * 600)] + [(v.id, 10 * 600) for _, v in own]:
        t = lg.inspect(token_id)
        held = sum(h.amount for h in written.values() if h.token_id == token_id)
        assert t.remaining >= 0 and t.remaining + t.held == minted and t.held == held
    assert sum(1 for h in written.values() if h.token_id == hot_view.id) == 40  # all of it
    lost = sum(fast.lost for fast, _ in daemons)
    assert len(answered) - len(written) == lost
    assert lg.verify_journal().ok
    print(f"answered {len(answered)}, written {len(written)}, lost {lost}, "
          f"refused {len(refused)}")
    lg.engine.dispose()
