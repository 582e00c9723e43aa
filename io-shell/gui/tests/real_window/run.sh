#!/bin/bash
# Real-window test of qpq-gui: a private Xvfb display, a private D-Bus
# session with the AT-SPI accessibility bus switched on, then drive.py.
#
#   io-shell/gui/tests/real_window/run.sh --bin target/debug --out /tmp/qpq-rw
#
# Arguments go to drive.py (--bin DIR with qpq-gui, qpq, qpq-server;
# --out DIR for screenshots and logs). Exit status is drive.py's.
# DRIVE_PY may name another script to run in the prepared session
# (instead of drive.py next to this file).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "${1:-}" = "--inner" ]; then
    # Inside dbus-run-session: the session bus is ours alone.
    shift
    launcher_pid=""
    registry_pid=""
    cleanup_inner() {
        # The registry (started by the accessibility bus, not by us
        # directly: its pid comes from that bus), then the launcher and
        # with it the accessibility bus; all before Xvfb goes.
        if [ -z "$registry_pid" ] && [ -n "$a11y_address" ]; then
            registry_pid=$(busctl --address="$a11y_address" call org.freedesktop.DBus /org/freedesktop/DBus \
                org.freedesktop.DBus GetConnectionUnixProcessID s org.a11y.atspi.Registry 2>/dev/null | awk '{print $2}')
        fi
        for pid in $registry_pid $launcher_pid; do
            kill "$pid" 2>/dev/null
        done
        for pid in $registry_pid $launcher_pid; do
            for _ in $(seq 1 30); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null
        done
        wait 2>/dev/null
    }
    a11y_address=""
    trap cleanup_inner EXIT
    # The accessibility bus: the launcher runs a second dbus-daemon, on
    # which the AT-SPI registry (at-spi2-registryd) is D-Bus-activated when
    # pyatspi first asks for it. Their chatter goes to at-spi.log in --out.
    out_dir=""
    prev=""
    for arg in "$@"; do
        [ "$prev" = "--out" ] && out_dir="$arg"
        case "$arg" in --out=*) out_dir="${arg#--out=}" ;; esac
        prev="$arg"
    done
    a11y_log=/dev/null
    if [ -n "$out_dir" ] && mkdir -p "$out_dir"; then
        a11y_log="$out_dir/at-spi.log"
    fi
    /usr/libexec/at-spi-bus-launcher --launch-immediately >"$a11y_log" 2>&1 &
    launcher_pid=$!
    ok=""
    for _ in $(seq 1 100); do
        # NameHasOwner, not a call to org.a11y.Bus: that would have the
        # session bus start a second launcher by D-Bus activation.
        if [ "$(busctl --user call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus NameHasOwner s org.a11y.Bus 2>/dev/null)" = "b true" ]; then
            ok=1
            break
        fi
        sleep 0.1
    done
    if [ -z "$ok" ]; then
        echo "run.sh: the AT-SPI bus launcher did not come up" >&2
        exit 2
    fi
    # AccessKit's Unix adapter publishes a window's tree only while
    # org.a11y.Status.IsEnabled is true (it watches the property); GTK
    # apps read the same switch.
    busctl --user set-property org.a11y.Bus /org/a11y/bus org.a11y.Status IsEnabled b true
    busctl --user set-property org.a11y.Bus /org/a11y/bus org.a11y.Status ScreenReaderEnabled b true
    a11y_address=$(busctl --user call org.a11y.Bus /org/a11y/bus org.a11y.Bus GetAddress | sed -e 's/^s "//' -e 's/"$//')
    # The apps must use X11 (Xvfb), never a Wayland compositor they might
    # find, and render with Mesa's software rasteriser.
    unset WAYLAND_DISPLAY
    export LIBGL_ALWAYS_SOFTWARE=1
    /usr/bin/python3 "${DRIVE_PY:-$here/drive.py}" "$@"
    exit $?
fi

for tool in Xvfb dbus-run-session busctl import /usr/libexec/at-spi-bus-launcher /usr/bin/python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run.sh: $tool is missing (Debian packages: see TESTING.md, the desktop app)" >&2
        exit 2
    fi
done
if ! /usr/bin/python3 -c 'import pyatspi' 2>/dev/null; then
    echo "run.sh: pyatspi is missing (Debian: python3-pyatspi)" >&2
    exit 2
fi

# A free display number: no lock file and no socket.
display=""
for n in $(seq 91 250); do
    if [ ! -e "/tmp/.X$n-lock" ] && [ ! -e "/tmp/.X11-unix/X$n" ]; then
        display=$n
        break
    fi
done
if [ -z "$display" ]; then
    echo "run.sh: no free X display number" >&2
    exit 2
fi

xvfb_pid=""
cleanup() {
    if [ -n "$xvfb_pid" ]; then
        kill "$xvfb_pid" 2>/dev/null
        wait "$xvfb_pid" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

Xvfb ":$display" -screen 0 1816x660x24 -nolisten tcp -noreset >/dev/null 2>&1 &
xvfb_pid=$!
for _ in $(seq 1 100); do
    [ -e "/tmp/.X11-unix/X$display" ] && break
    if ! kill -0 "$xvfb_pid" 2>/dev/null; then
        echo "run.sh: Xvfb :$display did not start" >&2
        exit 2
    fi
    sleep 0.1
done
if [ ! -e "/tmp/.X11-unix/X$display" ]; then
    echo "run.sh: Xvfb :$display did not start" >&2
    exit 2
fi

export DISPLAY=":$display"
unset DBUS_SESSION_BUS_ADDRESS AT_SPI_BUS_ADDRESS
dbus-run-session -- bash "$here/run.sh" --inner "$@"
status=$?
exit $status
