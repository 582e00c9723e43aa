#!/usr/bin/python3
"""Real-window test of qpq-gui, driven through the accessibility tree.

Two qpq-gui windows (Alice and Bob) and a qpq CLI user (Carol) against a
real qpq-server, on an X display with the AT-SPI bus switched on (run.sh
prepares both). Every action on the apps goes through AT-SPI: text is set
with EditableText.setTextContents (AccessKit's SetValue), buttons are
pressed with Action.doAction (AccessKit's Click), and what the windows
show is read from the tree. No pixel coordinates, no synthetic mouse or
keyboard. X is used directly only to move the two windows apart (for the
screenshots) and to read the clipboard after Bob's "Copy my key". Both
apps run with --mdns, so once they share a group they reach each other
directly, which their members panels must show.

  run.sh --bin target/debug --out /tmp/qpq-rw [--keep]

Screenshots (NN-step.png), the apps', server's and Carol's logs and, on
failure, failure.png and the accessibility trees go to --out. Exit
status 0 only if every step passed.
"""

import argparse
import ctypes
import ctypes.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyatspi

STEP_TIMEOUT = 30.0
# How long Bob's window is watched for the message sent after he was
# removed (besides the time Carol takes to receive it).
ABSENCE_WAIT = 5.0
# Where the two windows go (they are 900x640; run.sh makes the screen
# 1816x660), so both show in every screenshot.
ALICE_AT = (4, 10)
BOB_AT = (912, 10)

GROUP = "team"
PASSWORDS = {"Alice": "alice-Correct-Horse-1", "Bob": "bob-Battery-Staple-2"}
MSG_ALICE = "Hello from Alice, first message"
MSG_BOB = "Bob here, reading you"
MSG_CAROL = "Carol on the command line says hi"
MSG_AFTER = "Only Alice and Carol should read this"


class StepFailed(Exception):
    pass


def log(line):
    print(line, flush=True)


class X11:
    """The few Xlib calls the test needs: find a client's top-level window
    by its _NET_WM_PID and move it (so the two apps don't overlap in the
    screenshots), and read the CLIPBOARD selection (what "Copy my key" put
    there), as a user pasting it would."""
    def __init__(self):
        lib = ctypes.util.find_library("X11")
        if not lib:
            raise RuntimeError("libX11 not found")
        x = ctypes.cdll.LoadLibrary(lib)
        self.x = x
        x.XOpenDisplay.restype = ctypes.c_void_p
        x.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x.XDefaultRootWindow.restype = ctypes.c_ulong
        x.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x.XInternAtom.restype = ctypes.c_ulong
        x.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        x.XQueryTree.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.POINTER(ctypes.c_ulong)), ctypes.POINTER(ctypes.c_uint)]
        x.XGetWindowProperty.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_ulong), ctypes.POINTER(ctypes.c_void_p)]
        x.XFree.argtypes = [ctypes.c_void_p]
        x.XMoveWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int]
        x.XFlush.argtypes = [ctypes.c_void_p]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XCreateSimpleWindow.restype = ctypes.c_ulong
        x.XCreateSimpleWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulong]
        x.XConvertSelection.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        x.XCheckTypedWindowEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_void_p]
        x.XDestroyWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.d = x.XOpenDisplay(None)
        if not self.d:
            raise RuntimeError("cannot open the X display")
        self.root = x.XDefaultRootWindow(self.d)

    def atom(self, name):
        return self.x.XInternAtom(self.d, name.encode(), 0)

    def _prop(self, win, prop, req_type=0):
        t, f = ctypes.c_ulong(), ctypes.c_int()
        n, after = ctypes.c_ulong(), ctypes.c_ulong()
        data = ctypes.c_void_p()
        if self.x.XGetWindowProperty(self.d, win, prop, 0, 1 << 20, 0, req_type, ctypes.byref(t), ctypes.byref(f), ctypes.byref(n), ctypes.byref(after), ctypes.byref(data)) != 0 or not data.value:
            return None, None
        try:
            if f.value == 32:
                # Xlib returns format-32 items as C longs.
                return f.value, list((ctypes.c_ulong * n.value).from_address(data.value))
            size = n.value * f.value // 8
            return f.value, ctypes.string_at(data.value, size)
        finally:
            self.x.XFree(data)

    def windows_of_pid(self, pid):
        root_r, parent_r = ctypes.c_ulong(), ctypes.c_ulong()
        children, count = ctypes.POINTER(ctypes.c_ulong)(), ctypes.c_uint()
        self.x.XQueryTree(self.d, self.root, ctypes.byref(root_r), ctypes.byref(parent_r), ctypes.byref(children), ctypes.byref(count))
        wins = [children[i] for i in range(count.value)]
        if children:
            self.x.XFree(children)
        net_wm_pid = self.atom("_NET_WM_PID")
        found = []
        for w in wins:
            fmt, val = self._prop(w, net_wm_pid)
            if fmt == 32 and val and val[0] == pid:
                found.append(w)
        return found

    def move(self, win, x, y):
        self.x.XMoveWindow(self.d, win, x, y)
        self.x.XSync(self.d, 0)

    def clipboard(self, timeout=5.0):
        win = self.x.XCreateSimpleWindow(self.d, self.root, 0, 0, 1, 1, 0, 0, 0)
        try:
            prop = self.atom("QPQ_TEST_CLIPBOARD")
            self.x.XConvertSelection(self.d, self.atom("CLIPBOARD"), self.atom("UTF8_STRING"), prop, win, 0)
            self.x.XFlush(self.d)
            event = ctypes.create_string_buffer(256)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.x.XCheckTypedWindowEvent(self.d, win, 31, event):  # SelectionNotify
                    fmt, val = self._prop(win, prop)
                    return val.decode("utf-8", "replace") if fmt == 8 and val is not None else None
                time.sleep(0.05)
            return None
        finally:
            self.x.XDestroyWindow(self.d, win)
            self.x.XFlush(self.d)

    def close(self):
        self.x.XCloseDisplay(self.d)


def dump_tree(acc, depth=0, lines=None, limit=400):
    """The accessibility tree under `acc`, one node a line."""
    if lines is None:
        lines = []
    if len(lines) >= limit:
        return lines
    try:
        role = acc.getRoleName()
        name = acc.name
        extra = ""
        ifs = acc.get_interfaces()
        if "EditableText" in ifs or ("Text" in ifs and role not in ("label",)):
            try:
                t = acc.queryText()
                extra = f" text={t.getText(0, -1)!r}"
            except Exception:
                pass
        lines.append("  " * depth + f"[{role}] {name!r}{extra}")
        for child in acc:
            dump_tree(child, depth + 1, lines, limit)
    except Exception as e:  # a node went away while we walked
        lines.append("  " * depth + f"<unreadable: {e}>")
    return lines


def walk(acc):
    """Every node under `acc` (itself included)."""
    stack = [acc]
    while stack:
        node = stack.pop()
        yield node
        try:
            children = list(node)
        except Exception:
            children = []
        stack.extend(reversed(children))


def node_texts(node):
    """What a node says: its name and, if it has the Text interface, its
    text."""
    out = []
    try:
        if node.name:
            out.append(node.name)
        if "Text" in node.get_interfaces():
            t = node.queryText().getText(0, -1)
            if t:
                out.append(t)
    except Exception:
        pass
    return out


class App:
    """One qpq-gui process and its accessibility tree."""

    def __init__(self, who, proc, out):
        self.who = who
        self.proc = proc
        self.out = out

    def root(self):
        if self.proc.poll() is not None:
            raise StepFailed(f"{self.who}'s qpq-gui exited with status {self.proc.returncode} (see {self.who.lower()}-gui.log)")
        desktop = pyatspi.Registry.getDesktop(0)
        for app in desktop:
            try:
                if app is not None and app.get_process_id() == self.proc.pid:
                    try:
                        app.clear_cache()
                    except Exception:
                        pass
                    return app
            except Exception:
                continue
        return None

    def nodes(self):
        root = self.root()
        return list(walk(root)) if root is not None else []

    def find(self, name, role=None, interface=None, prefix=False):
        for n in self.nodes():
            try:
                nm = n.name
                if (nm.startswith(name) if prefix else nm == name) and (role is None or n.getRoleName() == role) and (interface is None or interface in n.get_interfaces()):
                    return n
            except Exception:
                continue
        return None

    def all_text(self):
        texts = []
        for n in self.nodes():
            texts.extend(node_texts(n))
        return texts

    def has_text(self, text):
        return any(text in t for t in self.all_text())

    def tree(self):
        root = self.root()
        if root is None:
            return f"({self.who}'s app is not on the accessibility bus)"
        return "\n".join(dump_tree(root))

    def wait(self, what, check, timeout=STEP_TIMEOUT, others=()):
        """Polls `check()` until it returns something truthy; fails with
        `what` and the tree (this app's and `others`') after `timeout`."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                result = check()
                if result:
                    return result
            except StepFailed:
                raise
            except Exception as e:  # a node went away mid-walk: try again
                last_error = e
            if time.monotonic() > deadline:
                fail(f"{self.who}: {what} (waited {timeout:.0f} s)" + (f"; last error: {last_error}" if last_error else ""), [self, *others])
            time.sleep(0.2)

    def fresh(self, name, role=None, interface=None):
        """The node named `name`, found again and its name, role and
        interfaces read afresh just before it is used: egui's ids of
        fields are fixed (`id_salt`), but a node found a moment ago may still
        be gone after the tree changed."""
        node = self.find(name, role=role, interface=interface)
        if node is None:
            return None
        try:
            node.clear_cache()
        except Exception:
            pass
        if node.name != name or (role and node.getRoleName() != role) or (interface and interface not in node.get_interfaces()):
            return None
        return node

    def holds(self, name, text, secret):
        n = self.find(name, interface="EditableText")
        if n is None:
            return False
        shown = n.queryText().getText(0, -1)
        # A password field shows bullets: only the length can be checked.
        return len(shown) == len(text) if secret else shown == text

    def set_text(self, name, text):
        """EditableText.setTextContents on the field named `name`, until
        the tree shows the field holding `text`."""
        deadline = time.monotonic() + STEP_TIMEOUT
        last = "no such field"
        while True:
            node = self.fresh(name, interface="EditableText")
            if node is not None:
                try:
                    secret = node.getRoleName() == "password text"
                    if node.queryEditableText().setTextContents(text):
                        # The app applies it on its next frame.
                        until = time.monotonic() + 3
                        while time.monotonic() < until:
                            if self.holds(name, text, secret):
                                return
                            time.sleep(0.1)
                        last = "setTextContents was accepted but the field did not show the text"
                    else:
                        last = "setTextContents returned false"
                except Exception as e:  # the object went away or changed
                    last = f"setTextContents failed: {e}"
            if time.monotonic() > deadline:
                fail(f"{self.who}: could not set the text field {name!r} to {text!r}: {last}", [self])
            time.sleep(0.2)

    def click(self, name, role="push button"):
        """Action 'click' on the `role` named `name`."""
        deadline = time.monotonic() + STEP_TIMEOUT
        last = f"no {role} named {name!r}"
        while True:
            node = self.fresh(name, role=role)
            if node is not None:
                try:
                    action = node.queryAction()
                    names = [action.getName(i) for i in range(action.nActions)]
                    if "click" not in names:
                        fail(f"{self.who}: {role} {name!r} has no click action (actions: {names})", [self])
                    if action.doAction(names.index("click")):
                        return
                    last = "doAction returned false"
                except StepFailed:
                    raise
                except Exception as e:  # the object went away or changed
                    last = f"doAction failed: {e}"
            if time.monotonic() > deadline:
                fail(f"{self.who}: could not click {role} {name!r}: {last}", [self])
            time.sleep(0.2)


OUT = None


def fail(message, apps=()):
    parts = [message]
    for app in apps:
        try:
            tree = app.tree()
        except Exception as e:
            tree = f"(could not read: {e})"
        parts.append(f"--- {app.who}'s accessibility tree ---\n{tree}")
        if OUT:
            with open(os.path.join(OUT, f"failure-tree-{app.who.lower()}.txt"), "w") as f:
                f.write(tree + "\n")
    if OUT:
        screenshot(os.path.join(OUT, "failure.png"), must=False)
    raise StepFailed("\n".join(parts))


def screenshot(path, must=True):
    r = subprocess.run(["import", "-window", "root", path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    if r.returncode != 0 and must:
        raise StepFailed(f"screenshot {path} failed: {r.stderr.decode(errors='replace')}")


class Procs:
    """Every process the test starts, to end them all whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def start_server(procs, bindir, work, out):
    os.makedirs(os.path.join(work, "server"))
    config = os.path.join(work, "server", "server.toml")
    open(config, "w").close()
    env = dict(os.environ, QPQ_CONFIG=config, QPQ_LISTEN="127.0.0.1:0", QPQ_DATA_DIR=os.path.join(work, "server", "data"), QPQ_LOG="warn")
    errlog = open(os.path.join(out, "server.log"), "w")
    p = procs.start([os.path.join(bindir, "qpq-server")], env=env, stdout=subprocess.PIPE, stderr=errlog, text=True)
    found = {}
    done = threading.Event()

    def read():
        for line in p.stdout:
            errlog.write(line)
            errlog.flush()
            if line.startswith("qpq-server listening on "):
                found["addr"] = line.split()[3]
            if line.startswith("certificate SHA-256 fingerprint: "):
                found["fp"] = line.split(": ", 1)[1].strip()
            if "addr" in found and "fp" in found:
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(STEP_TIMEOUT) or "addr" not in found or "fp" not in found:
        raise StepFailed(f"qpq-server did not print its address and fingerprint (got {found}; see server.log)")
    if not re.fullmatch(r"[0-9a-f]{64}", found["fp"]):
        raise StepFailed(f"qpq-server's fingerprint is not 64 hex digits: {found['fp']!r}")
    return found["addr"], found["fp"]


class Carol:
    """The qpq CLI user."""

    def __init__(self, bindir, work, addr, fp, out):
        self.qpq = os.path.join(bindir, "qpq")
        self.state = os.path.join(work, "carol", "state.bin")
        os.makedirs(os.path.dirname(self.state))
        self.addr, self.fp = addr, fp
        self.env = dict(os.environ, QPQ_PASSWORD="carol-Secret-Words-3")
        self.logf = open(os.path.join(out, "carol.log"), "w")
        self.received = ""

    def run(self, *args, timeout=STEP_TIMEOUT):
        cmd = [self.qpq, "--state", self.state, "--server", self.addr, "--server-fingerprint", self.fp, *args]
        self.logf.write(f"$ qpq {' '.join(args)}\n")
        try:
            r = subprocess.run(cmd, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            fail(f"Carol: `qpq {' '.join(args)}` did not finish in {timeout:.0f} s")
        self.logf.write(r.stdout + r.stderr + f"(exit {r.returncode})\n")
        self.logf.flush()
        if r.returncode != 0:
            fail(f"Carol: `qpq {' '.join(args)}` failed with status {r.returncode}:\n{r.stdout}{r.stderr}")
        return r.stdout

    def recv_until(self, what, check, timeout=STEP_TIMEOUT):
        """Runs `qpq recv` until `check(all output so far)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            self.received += self.run("recv", "--timeout-ms", "2000")
            if check(self.received):
                return
            if time.monotonic() > deadline:
                fail(f"Carol: {what} (waited {timeout:.0f} s); `qpq recv` printed so far:\n{self.received}")




def start_app(procs, who, bindir, work, out):
    home = os.path.join(work, who.lower())
    runtime = os.path.join(home, "runtime")
    os.makedirs(runtime, mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime, XDG_CACHE_HOME=os.path.join(home, "cache"), XDG_CONFIG_HOME=os.path.join(home, "config"), XDG_DATA_HOME=os.path.join(home, "data"))
    env.pop("WAYLAND_DISPLAY", None)
    env.pop("QPQ_STATE", None)
    logf = open(os.path.join(out, f"{who.lower()}-gui.log"), "w")
    # --mdns: the two apps find each other on this machine and keep a
    # direct link once they share a group.
    p = procs.start([os.path.join(bindir, "qpq-gui"), "--state", os.path.join(home, "state.bin"), "--mdns"], env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    return App(who, p, out)


def place_window(x11, app, at):
    def windows():
        if app.proc.poll() is not None:
            raise StepFailed(f"{app.who}'s qpq-gui exited with status {app.proc.returncode}")
        return x11.windows_of_pid(app.proc.pid)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not (wins := windows()):
        if time.monotonic() > deadline:
            raise StepFailed(f"{app.who}: no X window with _NET_WM_PID {app.proc.pid}")
        time.sleep(0.2)
    for w in wins:
        x11.move(w, *at)


def members_panel(app, present, absent, moment, timeout=5.0):
    """Checks, after one of Alice's Commits was taken by the server, that
    her members panel lists `present` and not `absent` (short keys) and
    that nothing waits for the server, within `timeout` (the app reads the
    group list again on membership events)."""
    def fresh():
        names = [n.name for n in app.nodes()]
        return (all(k in names for k in present) and not any(k in names for k in absent)
                and not any(n.endswith("waiting for server") for n in names))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fresh():
                return
        except Exception:
            pass
        time.sleep(0.2)
    shown = "; ".join(n.name for n in app.nodes() if n.getRoleName() in ("label", "toggle button") and (n.name.endswith("…") or "members" in n.name or "waiting" in n.name))
    fail(f"{app.who}: {moment}, the members panel was still stale after {timeout:.0f} s (expected {present} listed, {absent} not, nothing waiting); the tree showed: {shown}", [app])


def scenario(bindir, out, work, procs):
    t0 = time.monotonic()
    shots = []

    def passed(step):
        log(f"PASS {step}  [{time.monotonic() - t0:5.1f} s]")

    def shot(name):
        path = os.path.join(out, f"{len(shots) + 1:02d}-{name}.png")
        screenshot(path)
        shots.append(path)
        return path

    addr, fp = start_server(procs, bindir, work, out)
    passed(f"qpq-server listens on {addr}, fingerprint {fp[:16]}…")

    carol = Carol(bindir, work, addr, fp, out)
    carol.run("init")
    carol.run("register")
    whoami = carol.run("whoami")
    carol_key = next(iter(re.findall(r"\b[0-9a-f]{64}\b", whoami)), "")
    if not re.fullmatch(r"[0-9a-f]{64}", carol_key):
        fail(f"Carol: `qpq whoami` did not print a 64-hex-digit key: {carol_key!r}")
    passed(f"Carol (qpq CLI) made an identity and registered: {carol_key[:16]}…")

    x11 = X11()
    alice = start_app(procs, "Alice", bindir, work, out)
    bob = start_app(procs, "Bob", bindir, work, out)
    apps = (alice, bob)
    for app, at in ((alice, ALICE_AT), (bob, BOB_AT)):
        place_window(x11, app, at)
        app.wait("the first-run screen (button 'Create identity')", lambda app=app: app.find("Create identity", role="push button"))
    passed("both apps show the first-run screen on the accessibility bus")

    # First run: password, server, fingerprint to pin.
    for app in apps:
        pw = PASSWORDS[app.who]
        app.set_text("Password", pw)
        app.set_text("Repeat password", pw)
        app.set_text("Server address", addr)
        app.set_text("Server fingerprint", fp)
        app.wait("the password strength label", lambda app=app: app.find("Strength: strong", role="label"))
    shot("first-run-filled")
    passed("first-run forms filled in (password twice, server address, fingerprint)")

    for app in apps:
        app.click("Create identity")
    me = {}
    for app in apps:
        label = app.wait("the main screen with 'You: <key>' and 'connected', registered", lambda app=app: (
            (n := app.find("You: ", role="label", prefix=True)) is not None
            and app.find("connected", role="label") is not None
            and app.find("· registering…", role="label") is None
            and n.name))
        me[app.who] = label[len("You: "):].rstrip("…")
        if not re.fullmatch(r"[0-9a-f]{16}", me[app.who]):
            fail(f"{app.who}: 'You:' label does not show a short key: {label!r}", [app])
    shot("identities-created")
    passed(f"identities created, registered and connected: Alice {me['Alice']}…, Bob {me['Bob']}…")

    # Bob gives Alice his key the way a user would: "Copy my key", then
    # paste: the test reads the X clipboard Bob's app now owns, and checks
    # it against the whole key the 'You:' label describes to assistive
    # technology.
    bob.click("Copy my key")
    deadline = time.monotonic() + 10
    bob_key = None
    while time.monotonic() < deadline:
        bob_key = (x11.clipboard() or "").strip()
        if re.fullmatch(r"[0-9a-f]{64}", bob_key):
            break
        time.sleep(0.3)
    if not bob_key or not re.fullmatch(r"[0-9a-f]{64}", bob_key):
        raise StepFailed(f"Bob: 'Copy my key' did not put a 64-hex-digit key on the clipboard (got {bob_key!r})")
    if not bob_key.startswith(me["Bob"]):
        raise StepFailed(f"Bob: the copied key {bob_key} does not start with the short key his window shows ({me['Bob']}…)")
    you = bob.find("You: ", role="label", prefix=True)
    described = (you.description or "").strip() if you is not None else ""
    if described != bob_key:
        fail(f"Bob: the 'You:' label's accessible description {described!r} is not the key 'Copy my key' copied ({bob_key})", [bob])
    passed("Bob copied his identity key (clipboard); it matches the whole key his 'You:' label describes")

    # Alice makes the group.
    alice.set_text("New group", GROUP)
    alice.click("Create group")
    alice.wait(f"group {GROUP!r} open, with a Members panel listing only 'you'", lambda: (
        alice.find(GROUP, role="heading") or alice.find(GROUP)) and alice.find("Members") and alice.find("Member key", interface="EditableText") and alice.find("1 members"))
    shot("group-created")
    passed(f"Alice created group {GROUP!r}")

    # Alice adds Bob and Carol by pasting their keys. "you added <key>"
    # is shown once the server has taken the Commit.
    for who, key in (("Bob", bob_key), ("Carol", carol_key)):
        alice.set_text("Member key", key)
        alice.click("Add member")
        short = key[:16] + "…"
        alice.wait(f"'you added {short}' in the conversation ({who}'s add taken by the server)", lambda short=short: alice.has_text(f"you added {short}"))
        passed(f"Alice added {who} ({short})")
        members_panel(alice, [short], [], f"after adding {who}")
    bob.wait(f"Bob joined {GROUP!r} (its conversation open, 'you joined')", lambda: bob.find(GROUP) and bob.has_text("you joined") and bob.find("Message", interface="EditableText"))
    carol.recv_until(f"joined {GROUP!r}", lambda s: GROUP in s)
    shot("members-added")
    passed("Bob's window shows the group; Carol's `qpq recv` joined it")

    # Everyone talks.
    def send_from_app(app, text):
        app.set_text("Message", text)
        app.click("Send")
        app.wait(f"its own message {text!r} in the conversation, delivered (stored on the server or taken directly)", lambda: app.find(text, role="label") and app.find("you ", role="label", prefix=True) and any(
            n.name.startswith("you ") and "· delivered" in n.name for n in app.nodes()))

    send_from_app(alice, MSG_ALICE)
    bob.wait(f"Alice's message {MSG_ALICE!r} in the conversation", lambda: bob.find(MSG_ALICE, role="label"), others=[alice])
    carol.recv_until(f"Alice's message {MSG_ALICE!r}", lambda s: MSG_ALICE in s)
    passed("Alice's message reached Bob's window and Carol")

    send_from_app(bob, MSG_BOB)
    alice.wait(f"Bob's message {MSG_BOB!r} in the conversation", lambda: alice.find(MSG_BOB, role="label"), others=[bob])
    carol.recv_until(f"Bob's message {MSG_BOB!r}", lambda s: MSG_BOB in s)
    passed("Bob's message reached Alice's window and Carol")

    carol.run("send", GROUP, MSG_CAROL)
    for app in apps:
        app.wait(f"Carol's message {MSG_CAROL!r} in the conversation", lambda app=app: app.find(MSG_CAROL, role="label"))
    passed("Carol's message (qpq send) reached both windows")

    # Alice's sends refreshed her members panel: now it must be right.
    alice.wait("the members panel listing Bob and Carol, '3 members', nothing waiting", lambda: alice.find(me["Bob"] + "…", role="label") and alice.find(carol_key[:16] + "…", role="label") and alice.find("3 members") and not any(n.name.endswith("waiting for server") for n in alice.nodes()))

    def conversation_in_trees(moment):
        for app in apps:
            missing = [m for m in (MSG_ALICE, MSG_BOB, MSG_CAROL) if app.find(m, role="label") is None]
            if missing:
                fail(f"{app.who}: {moment} the conversation lacks {missing}", [app])

    conversation_in_trees("just before the screenshot,")
    shot("conversation")
    conversation_in_trees("just after the screenshot,")
    passed("conversation screenshot taken with all three messages in both trees")

    # Both apps run with --mdns: each finds the other and marks it reached
    # directly in its members panel (Carol, on the CLI, has no link).
    for app in apps:
        app.wait("the members panel marking the other app's user 'reached directly'", lambda app=app: app.find("reached directly", role="label"))
    shot("reached-directly")
    passed("Alice and Bob reach each other directly (mDNS), and their members panels say so")

    # Alice removes Bob.
    bob_short = me["Bob"] + "…"
    alice.click(f"Remove {bob_short}")
    alice.wait(f"'you removed {bob_short}' in the conversation", lambda: alice.has_text(f"you removed {bob_short}"), others=[bob])
    passed("Alice removed Bob (the server took the Commit)")
    members_panel(alice, [carol_key[:16] + "…"], [bob_short], "after removing Bob")
    how = bob.wait("Bob's window to show he was removed ('… removed you from the group', or the group gone)", lambda: (
        "it says '… removed you from the group'" if bob.has_text("removed you from the group")
        else "the group is gone from it" if not bob.find(GROUP) else None), others=[alice])
    carol.recv_until("Bob's removal", lambda s: "removed" in s.split(MSG_CAROL)[-1])
    shot("bob-removed")
    passed(f"Bob's window shows the removal ({how}); Carol's `qpq recv` saw it")

    # A message after the removal reaches Carol, never Bob.
    send_from_app(alice, MSG_AFTER)
    alice.wait("the members panel without Bob, '2 members'", lambda: alice.find("2 members") and not alice.find(bob_short, role="label") and not alice.find(f"Remove {bob_short}"))
    carol.recv_until(f"Alice's post-removal message {MSG_AFTER!r}", lambda s: MSG_AFTER in s)
    passed("Alice's post-removal message reached Carol")
    watch_until = time.monotonic() + ABSENCE_WAIT
    while time.monotonic() < watch_until:
        if bob.has_text(MSG_AFTER):
            fail(f"Bob: the message Alice sent after removing him reached his window: {MSG_AFTER!r}", [bob])
        time.sleep(0.5)
    if not alice.find(MSG_AFTER, role="label"):
        fail(f"Alice: her own message {MSG_AFTER!r} left the conversation", [alice])
    shot("after-removal")
    if bob.has_text(MSG_AFTER):
        fail(f"Bob: the message Alice sent after removing him reached his window: {MSG_AFTER!r}", [bob])
    passed(f"{ABSENCE_WAIT:.0f} s after Carol got it, Bob's tree still lacks the post-removal message")
    x11.close()
    return time.monotonic() - t0


def main():
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="directory with qpq-gui, qpq and qpq-server")
    ap.add_argument("--out", required=True, help="directory for screenshots and logs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    args = ap.parse_args()
    bindir = os.path.abspath(args.bin)
    for b in ("qpq-gui", "qpq", "qpq-server"):
        if not os.access(os.path.join(bindir, b), os.X_OK):
            print(f"FAIL: {b} not found in {bindir}", file=sys.stderr)
            return 2
    if not os.environ.get("DISPLAY"):
        print("FAIL: no DISPLAY (run through run.sh)", file=sys.stderr)
        return 2
    OUT = os.path.abspath(args.out)
    os.makedirs(OUT, exist_ok=True)
    # What an earlier run left (run.sh's at-spi.log is this run's).
    for f in os.listdir(OUT):
        if re.fullmatch(r"\d\d-.*\.png|failure\.png|failure-tree-.*\.txt|(server|carol|alice-gui|bob-gui)\.log", f):
            os.remove(os.path.join(OUT, f))
    work = tempfile.mkdtemp(prefix="qpq-rw-")
    procs = Procs()
    try:
        took = scenario(bindir, OUT, work, procs)
        log(f"ALL PASSED in {took:.1f} s; screenshots and logs in {OUT}")
        return 0
    except StepFailed as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        import traceback
        traceback.print_exc()
        print(f"FAIL: unexpected error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        procs.stop_all()
        if args.keep:
            log(f"state kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
