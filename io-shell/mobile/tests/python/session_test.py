"""The mobile bindings, driven from Python as an app would drive them.

Run by `tests/bindings.rs`, which generates the Python module from the
built library, starts a qpq-server and sets:

- QPQ_SERVER, QPQ_SERVER_FINGERPRINT: the server and its fingerprint;
- QPQ_TEST_DIR: an empty directory for the state files;
- QPQ_MEMORY_MESSAGES: messages for the memory check (0: skip it).

Two identities in one process make a group, exchange 100 messages each way
with events through the listener, one restarts from its state file and
carries on, a wrong password and a wrong fingerprint come back as typed
errors, and sync_once delivers what arrived while no session ran.
"""

import os
import sys
import threading
import time

import quicproquo_mobile as qpq

SERVER = os.environ["QPQ_SERVER"]
FINGERPRINT = os.environ["QPQ_SERVER_FINGERPRINT"]
DIR = os.environ["QPQ_TEST_DIR"]
MEMORY_MESSAGES = int(os.environ.get("QPQ_MEMORY_MESSAGES", "0"))
PASSWORD = "correct horse battery staple"
# A bound for a hung step, not a speed check.
STEP_S = 120.0


def log(*args):
    print("[python]", *args, flush=True)


def settings(name, fingerprint=FINGERPRINT):
    return qpq.SessionSettings(
        state_path=os.path.join(DIR, name + ".qpq"),
        server=SERVER,
        server_fingerprint=fingerprint,
        server_ca_path=None,
    )


class Inbox(qpq.EventListener):
    """Collects events; tests wait on it."""

    def __init__(self, name):
        self.name = name
        self.events = []
        self.threads = set()
        self.cond = threading.Condition()
        self.on_message = None

    def on_event(self, event):
        with self.cond:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()
        if self.on_message and event.is_message():
            self.on_message(event)

    def messages(self, group=None):
        with self.cond:
            return [
                e for e in self.events
                if e.is_message() and (group is None or e.group == group)
            ]

    def wait(self, what, test):
        deadline = time.monotonic() + STEP_S
        with self.cond:
            while True:
                found = test(self.events)
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    kinds = [type(e).__name__ for e in self.events[-10:]]
                    raise AssertionError(f"{self.name}: no {what} within {STEP_S} s; last events {kinds}")
                self.cond.wait(left)

    def wait_messages(self, group, n):
        return self.wait(
            f"{n} messages in {group}",
            lambda evs: len([e for e in evs if e.is_message() and e.group == group]) >= n,
        )


def expect_error(kind, call):
    try:
        call()
    except kind as e:
        return e
    except qpq.QpqError as e:
        raise AssertionError(f"expected {kind.__name__}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {kind.__name__}, the call succeeded")


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def main():
    alice_in, bob_in = Inbox("alice"), Inbox("bob")
    alice = qpq.Session.create(settings("alice"), PASSWORD, alice_in)
    bob = qpq.Session.create(settings("bob"), PASSWORD, bob_in)
    assert len(alice.identity_key()) == 64
    reg = bob.register(3)
    assert reg.uploaded + reg.already >= 3 and reg.failed == 0, reg
    alice.register(1)
    log("both registered")

    # Typed errors for bad arguments, before anything else.
    expect_error(qpq.QpqError.InvalidArgument, lambda: alice.add_member("chat", "not a key"))
    expect_error(qpq.QpqError.UnknownGroup, lambda: alice.send("nowhere", "hi"))
    expect_error(qpq.QpqError.StateInUse, lambda: qpq.Session.open(settings("alice"), PASSWORD, None))
    expect_error(qpq.QpqError.InvalidArgument, lambda: qpq.Session.open(settings("alice", "12:34"), PASSWORD, None))

    alice.create_group("chat", False)
    alice.add_contact("bob", bob.identity_key())
    alice.add_member("chat", bob.identity_key())
    bob_in.wait("the Welcome", lambda evs: [e for e in evs if e.is_joined() and e.group == "chat"])
    members = {m.key: m for m in alice.members("chat")}
    assert set(members) == {alice.identity_key(), bob.identity_key()}, members
    assert members[bob.identity_key()].name == "bob"
    assert members[alice.identity_key()].is_self
    # Both sides see the same safety number once they are at one epoch.
    a_sn = alice.safety_number("chat")
    b_sn = bob_in.wait("the same epoch", lambda _: (lambda n: n if n.epoch == a_sn.epoch else None)(bob.safety_number("chat")))
    assert a_sn.digits == b_sn.digits and len(a_sn.digits) == 60
    log("group made; safety numbers agree at epoch", a_sn.epoch)

    # 100 messages each way, sent from two threads at once.
    def send_all(session, who):
        for i in range(100):
            session.send("chat", f"{who} {i}")

    threads = [threading.Thread(target=send_all, args=(alice, "alice")),
               threading.Thread(target=send_all, args=(bob, "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got_bob = bob_in.wait_messages("chat", 100)
    got_alice = alice_in.wait_messages("chat", 100)
    assert [e.text for e in bob_in.messages("chat")] == [f"alice {i}" for i in range(100)]
    assert [e.text for e in alice_in.messages("chat")] == [f"bob {i}" for i in range(100)]
    assert all(e.sender == alice.identity_key() for e in bob_in.messages("chat"))
    assert all(e.sender_name == "bob" for e in alice_in.messages("chat"))
    # One event thread of the session's, never the caller's.
    assert len(alice_in.threads) == 1, alice_in.threads
    assert threading.main_thread().name not in alice_in.threads, alice_in.threads
    log("100 messages each way, in order, through the listener")

    # A reply, an edit and a deletion by id.
    first = bob_in.messages("chat")[0]
    sent = bob.send_reply("chat", "a reply", first.id)
    alice_in.wait_messages("chat", 101)
    reply = alice_in.messages("chat")[100]
    assert reply.reply_to == first.id and reply.id == sent.id, reply
    bob.edit("chat", sent.id, "an edited reply")
    alice_in.wait("the edit", lambda evs: [e for e in evs if e.is_edited() and e.target == sent.id and e.text == "an edited reply"])
    bob.delete("chat", sent.id)
    alice_in.wait("the deletion", lambda evs: [e for e in evs if e.is_deleted() and e.target == sent.id])
    f = bob.send_file("chat", qpq.Attachment(media_type="text/plain", name="note.txt", data=b"\x00\x01 bytes"))
    alice_in.wait("the file", lambda evs: [e for e in evs if e.is_message() and e.id == f.id and e.attachment and e.attachment.data == b"\x00\x01 bytes"])
    log("reply, edit, deletion and file arrive")

    # The listener may call its session: Alice's answers a ping from her
    # event thread.
    alice_in.on_message = lambda e: alice.send("chat", "pong") if e.text == "ping" else None
    bob.send("chat", "ping")
    bob_in.wait("the pong", lambda evs: [e for e in evs if e.is_message() and e.text == "pong"])
    # A listener that raises loses only that event's handling.
    def boom(e):
        if e.text == "boom":
            raise ValueError("the app's listener failed")
    alice_in.on_message = boom
    bob.send("chat", "boom")
    bob.send("chat", "after the boom")
    alice_in.wait("the message after the boom", lambda evs: [e for e in evs if e.is_message() and e.text == "after the boom"])
    alice_in.on_message = None
    log("a listener called its session from the event thread; one that raised lost nothing after")

    # Bob restarts from his state file and carries on.
    bob.close()
    expect_error(qpq.QpqError.Closed, lambda: bob.send("chat", "after close"))
    expect_error(qpq.QpqError.WrongPassword, lambda: qpq.Session.open(settings("bob"), "wrong password", None))
    expect_error(qpq.QpqError.IdentityExists, lambda: qpq.Session.create(settings("bob"), PASSWORD, None))
    expect_error(qpq.QpqError.NoStateFile, lambda: qpq.Session.open(settings("nobody"), PASSWORD, None))
    bob_in2 = Inbox("bob again")
    bob = qpq.Session.open(settings("bob"), PASSWORD, bob_in2)
    assert [g.name for g in bob.groups()] == ["chat"]
    alice.send("chat", "after bob's restart")
    bob_in2.wait_messages("chat", 1)
    assert bob_in2.messages("chat")[0].text == "after bob's restart"
    bob.send("chat", "bob is back")
    alice_in.wait("bob's message after his restart", lambda evs: [e for e in evs if e.is_message() and e.text == "bob is back"])
    log("bob restarted from his state file and carries on")

    # While no session of Bob's runs, Alice sends; sync_once delivers it.
    bob.close()
    for i in range(5):
        alice.send("chat", f"while bob slept {i}")
    alice_in.wait("5 deliveries", lambda evs: len([e for e in evs if e.is_delivered()]) >= 100 + 1 + 5)
    woke = Inbox("bob woken")
    report = qpq.sync_once(settings("bob"), PASSWORD, 60_000, woke)
    texts = [e.text for e in woke.messages("chat")]
    assert texts == [f"while bob slept {i}" for i in range(5)], texts
    assert report.messages == 5, report
    # Nothing is delivered twice: the next wake finds nothing new.
    again = Inbox("bob woken again")
    report = qpq.sync_once(settings("bob"), PASSWORD, 60_000, again)
    assert report.messages == 0 and again.messages() == [], report
    log("sync_once delivered the 5 messages sent while no session ran, once")

    # A wrong fingerprint: typed, on the call that needs the server.
    wrong = "ab" * 32
    e = expect_error(qpq.QpqError.FingerprintMismatch, lambda: qpq.sync_once(settings("bob", wrong), PASSWORD, 60_000, None))
    assert e.expected == wrong and e.got == FINGERPRINT.lower().replace(":", ""), e
    carol_in = Inbox("carol")
    carol = qpq.Session.create(settings("carol", wrong), PASSWORD, carol_in)
    expect_error(qpq.QpqError.FingerprintMismatch, lambda: carol.register(1))
    carol_in.wait("a permanent disconnection", lambda evs: [e for e in evs if e.is_disconnected() and e.permanent])
    carol.close()
    log("a wrong fingerprint comes back as FingerprintMismatch")

    # No server at the address: ServerUnreachable, within the time given.
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    nowhere = settings("bob")
    nowhere.server = closed
    start = time.monotonic()
    expect_error(qpq.QpqError.ServerUnreachable, lambda: qpq.sync_once(nowhere, PASSWORD, 2_000, None))
    assert time.monotonic() - start < STEP_S
    log("no server at the address comes back as ServerUnreachable")

    if MEMORY_MESSAGES:
        memory(alice, alice_in)
    alice.close()
    log("all passed")


def memory(alice, alice_in):
    """MEMORY_MESSAGES messages from Bob to Alice through the bindings, RSS
    sampled every tenth of the way; prints the figures."""
    bob_in = Inbox("bob (memory)")
    bob = qpq.Session.open(settings("bob"), PASSWORD, bob_in)
    # The events are the app's to keep or drop; this one drops them.
    with alice_in.cond:
        alice_in.events.clear()
    samples = []
    step = max(MEMORY_MESSAGES // 10, 1)
    start = time.monotonic()
    for i in range(MEMORY_MESSAGES):
        bob.send("chat", f"memory {i} " + "x" * 100)
        if (i + 1) % step == 0:
            alice_in.wait_messages("chat", step)
            with alice_in.cond:
                alice_in.events.clear()
            with bob_in.cond:
                bob_in.events.clear()
            samples.append((i + 1, rss_kib()))
            log(f"memory: {i + 1} messages, RSS {samples[-1][1]} KiB")
    took = time.monotonic() - start
    bob.close()
    first, last = samples[0][1], samples[-1][1]
    mid = samples[len(samples) // 2][1]
    print(f"MEMORY messages={MEMORY_MESSAGES} seconds={took:.1f} "
          f"rss_first_kib={first} rss_mid_kib={mid} rss_last_kib={last} "
          f"samples={samples}", flush=True)
    # Stable: the second half grows by less than 10% of the first sample.
    assert last - mid < first // 10, f"RSS grew from {mid} to {last} KiB in the second half"


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("[python] FAILED:", e, file=sys.stderr, flush=True)
        raise
