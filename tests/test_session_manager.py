"""The session manager against OWASP ASVS 5.0 chapter V7: each test names the requirement.

The store behaviour under it is the conformance suite's (test_sessions_store.py);
these tests run on the memory store unless they need a real server.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polybus import DecodeError, EncodeError
from polybus.codecs import JSON, decoder_for
from polybus.sessions import (
    ClientInfo,
    SessionConflict,
    SessionManager,
    SessionRecord,
    SessionStoreUnavailable,
    handle_of,
    new_session_id,
    open_sessions,
    open_store,
    store_key,
)
from polybus.sessions import base as session_base
from polybus.sessions.base import CODECS
from polybus.sessions.stores.memory import MemoryStore
from polybus.testing import servers
from polybus.testing.plugin import require_server

IDLE, ABSOLUTE = 30 * 60, 8 * 3600
BROWSER = ClientInfo("Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0", "198.51.100.23")


class Clock:
    """A clock the test moves; starts at the real time so stores' own expiry agrees."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingStore(MemoryStore):
    """A memory store that counts its loads (to prove a request never reached it)."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    def load(self, session_id: str) -> Any:
        self.loads += 1
        return super().load(session_id)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> Iterator[CountingStore]:
    s = CountingStore()
    yield s
    s.close()


@pytest.fixture
def manager(store: CountingStore, clock: Clock) -> SessionManager:
    return SessionManager(store, clock=clock)


def logged_in(manager: SessionManager, user: str = "alice", **data: Any) -> Any:
    session = manager.load(None, BROWSER)
    session.update(data)
    return manager.login(session, user)


# -- 7.2 fundamental session management -------------------------------------------------


def test_v7_2_3_ids_are_256_bits_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = session_base.secrets.token_urlsafe

    def spy(nbytes: int) -> str:
        asked.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(session_base.secrets, "token_urlsafe", spy)
    ids = {new_session_id() for _ in range(1000)} | {new_session_id("beef") for _ in range(1000)}
    assert len(ids) == 2000
    assert set(asked) == {32}
    for sid in list(ids)[:50]:
        token = sid.rpartition(".")[2]
        assert len(base64.urlsafe_b64decode(token + "=")) == 32  # 256 bits


def test_v7_2_1_an_id_the_server_never_issued_is_refused(
    manager: SessionManager, store: CountingStore
) -> None:
    """Session fixation: an attacker's made-up id is never adopted."""
    planted = new_session_id()  # well formed, never stored
    session = manager.load(planted, BROWSER)
    assert session.is_new
    assert session.id != planted
    session["cart"] = ["book"]
    assert manager.save(session)
    assert store.load(store_key(planted)) is None
    assert manager.load(planted).id != planted


@pytest.mark.parametrize(
    "presented",
    ["", "short", "x" * 44, "../../etc/passwd", "*", "abcd.{evil}" + "a" * 38, "a" * 43 + "\n"],
)
def test_v7_2_1_a_malformed_id_never_reaches_the_store(
    manager: SessionManager, store: CountingStore, presented: str
) -> None:
    session = manager.load(presented)
    assert session.is_new
    assert session.id != presented
    assert store.loads == 0


def test_v7_2_4_login_issues_a_new_id_and_ends_the_old_one(manager: SessionManager) -> None:
    """Session fixation: the attacker knows the victim's anonymous id; after the victim
    logs in, that id gives the attacker nothing."""
    anonymous = manager.load(None, BROWSER)
    anonymous["cart"] = ["book"]
    assert manager.save(anonymous)
    known_to_attacker = anonymous.id

    session = manager.login(manager.load(known_to_attacker, BROWSER), "alice")
    assert session.id != known_to_attacker
    assert session.user_id == "alice"
    assert session["cart"] == ["book"]  # the data carries over
    assert manager.load(session.id, BROWSER).user_id == "alice"
    attacker = manager.load(known_to_attacker)
    assert attacker.is_new
    assert attacker.user_id is None
    assert attacker.id != known_to_attacker


def test_v7_2_4_login_again_rotates_again(manager: SessionManager, clock: Clock) -> None:
    first = logged_in(manager)
    clock.advance(60)
    second = manager.login(manager.load(first.id), "alice")  # re-authentication
    assert second.id != first.id
    assert manager.load(first.id).is_new
    assert second.created_at == clock.now  # a new authentication: a new absolute deadline


def test_v7_2_4_another_users_login_starts_with_no_data(manager: SessionManager) -> None:
    """A shared browser: alice's session, then bob logs in on it. Bob must not get what
    alice stored; alice logging in again keeps it."""
    alices = logged_in(manager, payout_account="alice-iban")
    again = manager.login(manager.load(alices.id), "alice")
    assert again["payout_account"] == "alice-iban"
    bobs = manager.login(manager.load(again.id), "bob")
    assert bobs.user_id == "bob"
    assert dict(bobs) == {}
    assert dict(manager.load(bobs.id)) == {}
    assert manager.load(again.id).is_new  # and alice's session ended with the switch


def test_v7_2_4_a_privilege_change_rotates_the_id(manager: SessionManager, clock: Clock) -> None:
    session = logged_in(manager, role="user")
    created = session.created_at
    clock.advance(60)
    session["role"] = "admin"
    elevated = manager.rotate(session)
    assert elevated.id != session.id
    assert (elevated.user_id, elevated["role"]) == ("alice", "admin")
    assert elevated.created_at == created  # rotation does not extend the absolute timeout
    assert manager.load(session.id).is_new
    assert manager.load(elevated.id)["role"] == "admin"
    assert not manager.save(session)  # the old object is spent


def test_v7_4_2_a_rotation_never_brings_back_a_session_ended_meanwhile(
    manager: SessionManager,
) -> None:
    """A request that loaded the session before "log out everywhere" and rotates after it
    gets a new anonymous session, and the user has none."""
    session = logged_in(manager, role="user")
    request = manager.load(session.id)
    assert manager.logout_everywhere("alice") == 1
    request["role"] = "admin"
    rotated = manager.rotate(request)
    assert rotated.is_new
    assert rotated.user_id is None
    assert "role" not in rotated
    assert manager.sessions_of("alice") == []
    assert not manager.save(request)


def test_v7_2_4_a_rotation_keeps_what_another_request_saved_meanwhile(
    manager: SessionManager,
) -> None:
    session = logged_in(manager, role="user", cart=[])
    request, other = manager.load(session.id), manager.load(session.id)
    other["cart"] = ["book"]
    assert manager.save(other)
    request["role"] = "admin"
    rotated = manager.rotate(request)
    assert manager.load(rotated.id).to_dict() == {"role": "admin", "cart": ["book"]}
    assert manager.load(session.id).is_new


def test_rotating_a_session_never_stored_stores_nothing(
    manager: SessionManager, store: CountingStore
) -> None:
    session = manager.load(None)
    rotated = manager.rotate(session)
    assert rotated.id != session.id
    assert store.load(store_key(rotated.id)) is None
    assert manager.load(rotated.id).is_new


# -- 7.3 session timeout ------------------------------------------------------------------


def test_v7_3_1_idle_timeout(manager: SessionManager, clock: Clock) -> None:
    session = logged_in(manager)
    clock.advance(IDLE - 1)
    session = manager.load(session.id)
    assert not session.is_new
    assert manager.save(session)  # activity: the idle deadline moves
    clock.advance(IDLE - 1)
    assert not manager.load(session.id).is_new
    clock.advance(2)  # IDLE + 1 since the last activity
    assert manager.load(session.id).is_new


def test_v7_3_1_reads_alone_move_the_idle_deadline(manager: SessionManager, clock: Clock) -> None:
    session = logged_in(manager)
    version = session.version
    clock.advance(10)  # within touch_interval: nothing is written
    assert manager.save(manager.load(session.id))
    assert manager.load(session.id).version == version
    for _ in range(5):  # a request every 20 minutes keeps it alive past the idle timeout
        clock.advance(20 * 60)
        s = manager.load(session.id)
        assert not s.is_new
        assert manager.save(s)
    assert manager.load(session.id).version > version


def test_v7_3_2_absolute_timeout_ends_an_active_session(
    manager: SessionManager, clock: Clock
) -> None:
    session = logged_in(manager)
    for _ in range(ABSOLUTE // 600 - 1):  # active every 10 minutes for almost 8 hours
        clock.advance(600)
        s = manager.load(session.id)
        assert not s.is_new
        s["tick"] = clock.now
        assert manager.save(s)
    clock.advance(600)
    assert manager.load(session.id).is_new


def test_v7_3_timeouts_are_validated() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        SessionManager("memory://", idle_timeout=3600, absolute_timeout=60)
    with pytest.raises(ValueError, match="touch_interval"):
        SessionManager("memory://", idle_timeout=60, touch_interval=60)


# -- 7.4 session termination --------------------------------------------------------------


def test_v7_4_1_logout_destroys_the_session_server_side(
    manager: SessionManager, store: CountingStore
) -> None:
    session = logged_in(manager)
    other_request = manager.load(session.id)  # a request still running during the logout
    manager.logout(session)
    assert store.load(store_key(session.id)) is None
    assert manager.load(session.id).is_new
    other_request["late"] = True
    assert manager.save(other_request) is False  # a late save does not bring it back
    assert store.load(store_key(session.id)) is None


def test_v7_4_2_and_7_4_5_end_every_session_of_a_disabled_user(manager: SessionManager) -> None:
    sessions = [logged_in(manager, "mallory") for _ in range(3)]
    bystander = logged_in(manager, "bob")
    assert manager.logout_everywhere("mallory") == 3
    assert all(manager.load(s.id).is_new for s in sessions)
    assert manager.sessions_of("mallory") == []
    assert not manager.load(bystander.id).is_new


def test_v7_4_3_end_every_other_session_after_a_password_change(
    manager: SessionManager,
) -> None:
    current, *others = [logged_in(manager) for _ in range(3)]
    assert manager.logout_others(current) == 2
    assert not manager.load(current.id).is_new
    assert all(manager.load(s.id).is_new for s in others)
    assert manager.logout_others(manager.load(None)) == 0  # anonymous: nothing to end


def test_v7_5_2_list_and_end_ones_own_sessions(manager: SessionManager, clock: Clock) -> None:
    laptop = manager.login(manager.load(None, BROWSER), "alice")
    clock.advance(5)
    phone_client = ClientInfo("Mobile Safari/605.1", "203.0.113.9")
    phone = manager.login(manager.load(None, phone_client), "alice")
    listed = manager.sessions_of("alice")
    assert [i.client for i in listed] == [BROWSER, phone_client]
    assert [i.created_at for i in listed] == [laptop.created_at, phone.created_at]
    assert all(i.last_seen >= i.created_at for i in listed)
    # the list never shows an id (a credential), only a handle
    assert laptop.id not in repr(listed)
    assert phone.id not in repr(listed)
    assert laptop.id not in repr(laptop)
    assert listed[1].handle == handle_of(phone.id)
    assert manager.end_session("alice", listed[1].handle) is True
    assert manager.load(phone.id).is_new
    assert not manager.load(laptop.id).is_new
    assert manager.end_session("alice", listed[1].handle) is False


# -- data, conflicts, binding, store failures ---------------------------------------------


def test_concurrent_requests_merge_different_keys(manager: SessionManager) -> None:
    session = logged_in(manager, n=0)
    a, b = manager.load(session.id), manager.load(session.id)
    a["theme"] = "dark"
    b["lang"] = "fr"
    del b["n"]
    assert manager.save(a)
    assert manager.save(b)
    assert manager.load(session.id).to_dict() == {"theme": "dark", "lang": "fr"}
    assert b.to_dict() == {"theme": "dark", "lang": "fr"}  # the saved object holds the merge


def test_a_key_mutated_in_place_merges_with_a_change_of_another_key(
    manager: SessionManager,
) -> None:
    session = logged_in(manager, cart=["pen"])
    a, b = manager.load(session.id), manager.load(session.id)
    a["cart"].append("book")
    a.mark_changed("cart")
    b["theme"] = "dark"
    assert manager.save(b)
    assert manager.save(a)  # no conflict: b changed another key
    assert manager.load(session.id).to_dict() == {"cart": ["pen", "book"], "theme": "dark"}


@pytest.mark.parametrize(("policy", "expected"), [("ours", 2), ("theirs", 1)])
def test_a_real_conflict_follows_the_policy(
    store: CountingStore, clock: Clock, policy: Any, expected: int
) -> None:
    manager = SessionManager(store, clock=clock, on_conflict=policy)
    session = logged_in(manager, n=0)
    first, second = manager.load(session.id), manager.load(session.id)
    first["n"] = 1
    second["n"] = 2
    second["other"] = True
    assert manager.save(first)
    assert manager.save(second)
    assert manager.load(session.id).to_dict() == {"n": expected, "other": True}


def test_a_real_conflict_raises_by_default_and_writes_nothing(manager: SessionManager) -> None:
    session = logged_in(manager, n=0)
    first, second = manager.load(session.id), manager.load(session.id)
    first["n"] = 1
    second["n"] = 2
    second["other"] = True
    assert manager.save(first)
    with pytest.raises(SessionConflict, match="'n'"):
        manager.save(second)
    assert manager.load(session.id).to_dict() == {"n": 1}


def test_an_empty_anonymous_session_is_not_stored(
    manager: SessionManager, store: CountingStore
) -> None:
    session = manager.load(None)
    assert manager.save(session) is False
    assert store.load(store_key(session.id)) is None


def test_data_is_json_or_msgpack_never_pickle(manager: SessionManager) -> None:
    session = logged_in(manager)
    session["when"] = {1, 2}  # a set: neither JSON nor msgpack
    with pytest.raises(EncodeError, match="JSON"):
        manager.save(session)
    session["when"] = float("nan")  # Python's json would write NaN, which is no JSON
    with pytest.raises(EncodeError, match="JSON"):
        manager.save(session)
    with open_sessions("memory://?codec=msgpack") as packed:
        s = packed.load(None)
        s["raw"] = b"\x00\xff"  # msgpack keeps bytes
        assert packed.save(s)
        assert packed.load(s.id)["raw"] == b"\x00\xff"


def test_circular_or_too_deep_data_is_an_encode_error(manager: SessionManager) -> None:
    session = logged_in(manager)
    loop: list[Any] = []
    loop.append(loop)
    session["loop"] = loop
    with pytest.raises(EncodeError, match="circular or nested too deep"):
        manager.save(session)
    deep: list[Any] = []
    for _ in range(sys.getrecursionlimit() + 10):
        deep = [deep]
    session["loop"] = deep
    with pytest.raises(EncodeError, match="circular or nested too deep"):
        manager.save(session)
    session["loop"] = [[[1]]]  # the encoder is still fine after those
    assert manager.save(session)
    assert manager.load(session.id)["loop"] == [[[1]]]
    with pytest.raises(DecodeError, match="not JSON"):
        CODECS["json"].load(b"[" * 100_000 + b"]" * 100_000)


def test_an_undecodable_session_yields_a_new_session_and_a_warning(
    manager: SessionManager, store: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    session = logged_in(manager)
    key = store_key(session.id)
    item = store._table.view.items[key]
    store._table.view.put(key, item._replace(payload=b"\x80garbage"))  # damaged bytes
    with caplog.at_level(logging.WARNING, logger="polybus.sessions"):
        fresh = manager.load(session.id)
    assert fresh.is_new
    assert fresh.id != session.id
    assert "could not be decoded" in caplog.text
    assert session.id not in caplog.text  # the id is a credential: never logged


def test_an_undecodable_session_in_redis(caplog: pytest.LogCaptureFixture) -> None:
    require_server("redis", servers.redis_unavailable())
    import redis

    prefix = f"test-{new_session_id()[:8]}"
    with SessionManager(f"{servers.redis_url()}?prefix={prefix}") as manager:
        session = logged_in(manager)
        raw = redis.Redis.from_url(servers.redis_url())
        key = f"{prefix}:{{{session.id.partition('.')[0]}}}:s:{store_key(session.id)}"
        assert raw.exists(key)
        raw.set(key, b"1:[1,2,3]")  # a plain client wrote something else there
        with caplog.at_level(logging.WARNING, logger="polybus.sessions"):
            assert manager.load(session.id).is_new
        assert "could not be decoded" in caplog.text
        assert not raw.exists(key)  # the damaged session is removed
        raw.close()


def test_binding_to_the_client_ends_a_session_presented_elsewhere(
    store: CountingStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    manager = SessionManager(store, clock=clock, bind_user_agent=True, bind_ip=True)
    session = manager.login(manager.load(None, BROWSER), "alice")
    same_subnet = BROWSER._replace(ip="198.51.100.200")
    assert not manager.load(session.id, same_subnet).is_new  # /24 kept: a NAT pool
    stolen = ClientInfo(BROWSER.user_agent, "192.0.2.50")  # the cookie used from elsewhere
    with caplog.at_level(logging.WARNING, logger="polybus.sessions"):
        assert manager.load(session.id, stolen).is_new
    assert "another client" in caplog.text
    assert manager.load(session.id, BROWSER).is_new  # ended, not just refused
    other = manager.login(manager.load(None, BROWSER), "alice")
    assert manager.load(other.id, BROWSER._replace(user_agent="curl/8.0")).is_new


def test_store_down_fails_closed_by_default() -> None:
    dead = f"redis://127.0.0.1:{servers.free_port()}/0"
    with SessionManager(dead) as manager, pytest.raises(SessionStoreUnavailable, match="Redis"):
        manager.load(new_session_id())
    with SessionManager(dead) as manager:
        session = manager.new()
        session["a"] = 1
        with pytest.raises(SessionStoreUnavailable):
            manager.save(session)


def test_store_down_fail_open_serves_an_unsaved_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"redis://127.0.0.1:{servers.free_port()}/0"
    with (
        SessionManager(dead, on_unavailable="fail_open") as manager,
        caplog.at_level(logging.WARNING, logger="polybus.sessions"),
    ):
        presented = new_session_id()
        session = manager.load(presented)
        assert session.is_new
        assert session.transient
        assert session.id != presented
        session["a"] = 1
        assert manager.save(session) is False
        with pytest.raises(SessionStoreUnavailable):  # termination must be confirmed
            manager.logout_everywhere("alice")
    assert "unavailable" in caplog.text


def test_open_store_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="scheme"):
        open_store("postgres://localhost/db")
    with pytest.raises(ValueError, match="expected scheme"):
        open_store("localhost:6379")
    with pytest.raises(ValueError, match="codec"):
        open_store("memory://?codec=pickle")
    with pytest.raises(ValueError, match="unknown option"):
        open_store("memory://?ttl=5")


@given(st.binary(max_size=200))
def test_any_stored_bytes_decode_to_a_record_or_a_decode_error(payload: bytes) -> None:
    for codec in CODECS.values():
        try:
            codec.decode(payload)
        except DecodeError:
            pass


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=11) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)


@given(_json_values)
def test_session_data_is_written_as_the_json_module_writes_it(value: Any) -> None:
    """The JSON codec's encoder made once gives the bytes of ``json.dumps`` with its
    options, and refuses what it refuses (NaN and the infinities)."""
    try:
        expected = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        with pytest.raises(EncodeError, match="JSON"):
            CODECS["json"].dump(value)
        return
    assert CODECS["json"].dump(value) == expected


@st.composite
def _json_texts(draw: st.DrawFn) -> bytes:
    """JSON text as the json module writes it, NaN, big ints and lone surrogates included,
    escaped or not, with some space around."""
    text = json.dumps(draw(_json_values), ensure_ascii=draw(st.booleans()))
    space = draw(st.sampled_from(["", " ", "\n\t"]))
    return (space + text + space).encode(errors="surrogatepass")


@settings(max_examples=300)
@given(st.binary(max_size=40) | _json_texts())
def test_session_json_is_read_as_the_json_module_reads_it(payload: bytes) -> None:
    """msgspec reads JSON records, and the json module what it refuses: either way the
    values of ``json.loads``, of the same types, or a DecodeError where it fails."""
    try:
        expected = json.loads(payload.decode())
    except (ValueError, UnicodeDecodeError):
        with pytest.raises(DecodeError, match="not JSON"):
            CODECS["json"].load(payload)
        with pytest.raises(DecodeError, match="not valid application/json"):
            decoder_for(JSON)(payload)  # messages' JSON is read the same way
        return
    assert repr(CODECS["json"].load(payload)) == repr(expected)  # 1 is not 1.0 nor True
    assert repr(decoder_for(JSON)(payload)) == repr(expected)


@settings(max_examples=50)
@given(st.lists(_json_values, min_size=11, max_size=11))
def test_any_record_shaped_data_decodes_or_fails_cleanly(fields: list[Any]) -> None:
    """A stored array of the right length but wrong contents is a DecodeError, and a record
    that does decode has the types the manager relies on."""
    fields[0] = 1
    for codec in CODECS.values():
        try:
            record = codec.decode(codec.dump(fields))
        except DecodeError:
            continue
        except EncodeError:  # NaN and friends are not JSON: such bytes cannot be stored
            continue
        assert isinstance(record.id, str)
        assert isinstance(record.data, dict)
        assert isinstance(record.expires_at, float)


_records = st.builds(
    SessionRecord,
    st.text(max_size=8),
    st.none() | st.text(max_size=8),
    st.integers(0, 2**63 - 1),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
    st.floats(allow_nan=False),
    st.builds(ClientInfo, st.text(max_size=8), st.text(max_size=8)),
    st.none() | st.text(max_size=8),
    st.dictionaries(st.text(max_size=3), _json_values, max_size=4),
)


def _as_the_manager_makes(record: SessionRecord) -> bool:
    """Text of printable ASCII and times without an exponent, where the JSON codec writes
    a record's head as the json module does, byte for byte."""
    texts = [record.id, record.user_id or "", *record.client, record.fingerprint or ""]
    times = record[3:6]
    return all(t.isascii() and t.isprintable() for t in texts) and "e" not in repr(times)


@settings(max_examples=50)
@given(_records)
def test_a_store_decodes_only_the_data_of_a_record_it_holds(record: SessionRecord) -> None:
    """The layout stays the one every reader knows (one array, the data last), and the
    data decoded alone from where encode_split says it starts is the data of the record."""
    for codec in CODECS.values():
        try:
            payload, start = codec.encode_split(record)
        except EncodeError:  # text msgpack cannot encode (a lone surrogate)
            continue
        fields = session_base._fields(record)
        assert repr(codec.load(payload)) == repr(codec.load(codec.dump(fields)))  # NaN
        if codec.name == "msgpack" or _as_the_manager_makes(record):
            assert payload == codec.dump(fields)  # byte for byte, as every reader knows it
        whole = codec.decode(payload)
        data = codec.decode_data(payload, start)
        assert codec.dump(data) == codec.dump(whole.data) == codec.dump(record.data)  # NaN
        assert codec.data_start(payload, whole) == start
        rebuilt = session_base.with_data(whole[:8], data)
        assert (type(rebuilt), rebuilt[:8], rebuilt.data) == (SessionRecord, whole[:8], data)
        listed, start = codec.encode_split(record._replace(data=[1]))
        with pytest.raises(DecodeError, match="not a dict"):
            codec.decode_data(listed, start)


def test_msgpack_sessions_keep_int_keys() -> None:
    with open_sessions("memory://?codec=msgpack") as manager:
        session = manager.load(None)
        session["by_id"] = {1: "a", 2: "b"}
        assert manager.save(session)
        assert manager.load(session.id)["by_id"] == {1: "a", 2: "b"}


def test_a_store_opens_on_a_bus_it_shares(tmp_path: Any) -> None:
    import polybus

    with polybus.connect(f"native://{tmp_path / 'log'}") as bus:
        store = open_store(bus)
        manager = SessionManager(store)
        session = manager.login(manager.load(None), "alice")
        assert manager.load(session.id).user_id == "alice"
        store.close()
        assert "sessions" in bus.backend.log.topics()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="cannot open a session store on a object"):
        open_store(object())


@pytest.mark.parametrize("kind", ["memory", "native", "redis"])
def test_v7_2_what_a_store_holds_is_no_cookie(kind: str, tmp_path: Any) -> None:
    """A leaked store (the native log's files, a Redis dump) holds no session id that
    works: each session is kept under a digest of its id, which the manager refuses as a
    cookie."""
    prefix = f"test-{new_session_id()[:8]}"
    if kind == "redis":
        require_server("redis", servers.redis_unavailable())
    url = {
        "memory": "memory://",
        "native": f"native://{tmp_path / 'log'}",
        "redis": f"{servers.redis_url()}?prefix={prefix}",
    }[kind]
    with SessionManager(url) as manager:
        session = logged_in(manager, cart=["book"])
        anonymous = manager.load(None)
        anonymous["a"] = 1
        assert manager.save(anonymous)
        held = _everything_held(kind, manager, tmp_path, prefix)
        for sid in (session.id, anonymous.id):
            token = sid.rpartition(".")[2].encode()
            assert not any(token in h for h in held), "a session id is stored in clear"
            key = store_key(sid)
            assert any(key.encode() in h for h in held)  # kept under the digest instead
            assert manager.load(key).is_new  # which does not work as a cookie
        assert manager.load(session.id)["cart"] == ["book"]
        assert manager.load(anonymous.id)["a"] == 1
        (listed,) = manager.sessions_of("alice")
        assert manager.end_session("alice", listed.handle) is True
        assert manager.load(session.id).is_new
        manager.logout(manager.load(anonymous.id))


def _everything_held(kind: str, manager: SessionManager, tmp_path: Any, prefix: str) -> list[bytes]:
    if kind == "memory":
        items = manager.store._table.view.items  # type: ignore[attr-defined]
        return [k.encode() for k in items] + [i.payload for i in items.values()]
    if kind == "native":
        return [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    import redis

    with redis.Redis.from_url(servers.redis_url()) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        held = [*keys, *(client.dump(k) for k in keys)]
    return [h for h in held if isinstance(h, bytes)]
