#!/usr/bin/env bash
# Checks the Dockerfile (and compose.yaml) as far as this machine allows,
# with or without a container engine.
#
# Whether or not one is there, it does on the host what the image would do:
#   1. reads the Dockerfile: every COPY source from the build context
#      exists and is not left out by .dockerignore, every COPY --from names
#      an earlier stage, the build stage's cargo command builds (with
#      --release --locked) exactly the binaries the stage copies out and the
#      runtime stage copies in, and cargo resolves the workspace --locked
#      from only the files the build stage copies;
#   2. runs the runtime stage against binaries built on the host, in a
#      temporary root: the files the stage copies, the volume directory
#      owned by the stage's user, the stage's ENV (paths moved under the
#      root), its WORKDIR, and its USER as an unprivileged uid (setpriv, when
#      run as root);
#   3. starts the server as the image's ENTRYPOINT would, runs the
#      HEALTHCHECK command (it must pass), stops the server with the
#      STOPSIGNAL and requires exit status 0 within Docker's stop timeout,
#      requires the HEALTHCHECK to fail while it is down, and starts it once
#      more on the same volume (same certificate fingerprint);
#   4. checks the image's configuration with `qpq-server check-config`,
#      that every QPQ_* variable the Dockerfile, compose.yaml and the
#      systemd files set is one qpq-server reads, and (with Python's yaml
#      module) compose.yaml's services, profiles and health dependency.
# Where a Docker daemon answers `docker info`, it also builds the image,
# runs it, waits for Docker to call it healthy and stops it. It says
# plainly what it could not run.
#
# Usage: packaging/docker-check.sh [--bin-dir DIR | --release] [--port N] [--no-engine] [--keep]
#   --bin-dir DIR  where qpq-server and qpq are (default: target/debug, the
#                  binaries `cargo test` builds; nothing is built)
#   --release      run the Dockerfile's own cargo command in the build
#                  stage's files and use its binaries
#                  (target/docker-check/release); many minutes of build
#   --port N       UDP port in place of the image's (default: the image's,
#                  7443), e.g. when that one is taken
#   --no-engine    leave a container engine alone even if one answers (the
#                  test suite passes it: a real build takes many minutes)
#   --keep         keep the temporary root (and print where it is)
# QPQ_PACKAGING_TESTS=require turns "not checked for lack of a tool" (the
# yaml module) into a failure; the container engine is never required.
set -euo pipefail
# Files copied into the temporary root get the modes a build context gives.
umask 022
# A command failing outside a check says where, instead of ending silently.
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND" >&2' ERR

root=$(cd "$(dirname "$0")/.." && pwd)
dockerfile=$root/Dockerfile
target_dir=${CARGO_TARGET_DIR:-$root/target}
# The cargo that runs the tests, when they run this.
cargo=${CARGO:-cargo}
bin_dir=
release=0
port=
keep=0
engine=1
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --release) release=1; shift ;;
        --port) port=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        --no-engine) engine=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

ran=()
not_run=()
say() { printf '== %s\n' "$*"; }
note() { printf '   %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
missing_tool() {
    if [ "${QPQ_PACKAGING_TESTS:-}" = require ]; then
        fail "$1 (QPQ_PACKAGING_TESTS=require)"
    fi
    not_run+=("$1")
}

# ------------------------------------------------------ the Dockerfile ---

# The Dockerfile as logical instructions: continuation lines joined,
# comment and empty lines dropped (Docker drops comment lines inside a
# continuation too). instr[i] is the keyword in capitals, args[i] the rest,
# stage_of[i] the index of the stage it belongs to (-1 before any FROM).
instr=()
args=()
stage_of=()
stage_names=()
stage_images=()
declare -A global_arg=()
parse_dockerfile() {
    local line logical="" stage=-1 kw rest
    while IFS= read -r line || [ -n "$line" ]; do
        [[ $line =~ ^[[:space:]]*# ]] && continue
        [[ $line =~ ^[[:space:]]*$ ]] && [ -z "$logical" ] && continue
        if [[ $line =~ \\[[:space:]]*$ ]]; then
            logical+="${line%\\*} "
            continue
        fi
        logical+=$line
        logical=$(sed 's/[[:space:]]\+/ /g; s/^ //; s/ $//' <<<"$logical")
        kw=${logical%% *}
        kw=${kw^^}
        rest=${logical#* }
        logical=""
        if [ "$kw" = FROM ]; then
            stage=$((stage + 1))
            local image=${rest%% *} name=
            if [[ ${rest,,} =~ \ as\ ([^ ]+)$ ]]; then
                name=${BASH_REMATCH[1]}
            fi
            image=$(expand_args "$image")
            stage_names+=("$name")
            stage_images+=("$image")
        elif [ "$kw" = ARG ] && [ $stage -lt 0 ]; then
            global_arg[${rest%%=*}]=${rest#*=}
        fi
        instr+=("$kw")
        args+=("$rest")
        stage_of+=("$stage")
    done <"$dockerfile"
}

# ${NAME} and $NAME of the global ARGs, replaced by their defaults.
expand_args() {
    local s=$1 name
    for name in "${!global_arg[@]}"; do
        s=${s//\$\{$name\}/${global_arg[$name]}}
        s=${s//\$$name/${global_arg[$name]}}
    done
    printf '%s' "$s"
}

# An exec-form array (["a", "b"]) as one word per line; only plain strings
# (no escapes) are accepted, which is all this Dockerfile uses.
exec_form() {
    local s=$1
    [[ $s =~ ^\[(.*)\]$ ]] || fail "not an exec-form array: $s"
    s=${BASH_REMATCH[1]}
    [[ $s == *\\* ]] && fail "escapes in an exec-form array are not supported here: $1"
    local IFS=,
    local word
    for word in $s; do
        word=$(sed 's/^ *"//; s/" *$//' <<<"$word")
        printf '%s\n' "$word"
    done
}

# Whether .dockerignore leaves `path` (relative to the context) out.
ignored() {
    local path=$1 pat
    [ -f "$root/.dockerignore" ] || return 1
    while IFS= read -r pat || [ -n "$pat" ]; do
        [[ $pat =~ ^[[:space:]]*(#|$) ]] && continue
        pat=${pat#/}
        # shellcheck disable=SC2053 # the pattern is a glob on purpose
        if [[ $path == $pat || $path == $pat/* || $path == ${pat#\*\*/} || $path == ${pat#\*\*/}/* ]]; then
            return 0
        fi
    done <"$root/.dockerignore"
    return 1
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qpq-docker-check.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    if [ $keep = 1 ]; then
        echo "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
chmod 0755 "$tmp"

say "reading the Dockerfile"
[ -f "$dockerfile" ] || fail "no Dockerfile at $dockerfile"
parse_dockerfile
[ ${#stage_names[@]} -ge 2 ] || fail "expected a build stage and a runtime stage, found ${#stage_names[@]} stage(s)"
runtime_stage=$((${#stage_names[@]} - 1))
build_stage=-1
for i in "${!stage_names[@]}"; do
    [ "${stage_names[$i]}" = build ] && build_stage=$i
done
[ "$build_stage" -ge 0 ] || fail "no stage named build (FROM ... AS build)"
for i in "${!stage_names[@]}"; do
    note "stage $i ${stage_names[$i]:-(unnamed)}: FROM ${stage_images[$i]}"
done

# A COPY's words: its stage (`--from=`, else empty) in `from`, its paths
# (the sources, then the destination) in `paths`; other flags ignored.
copy_words() {
    local w words
    read -r -a words <<<"$1"
    from=
    paths=()
    for w in "${words[@]}"; do
        case $w in
            --from=*) from=${w#--from=} ;;
            --*) ;;
            *) paths+=("$w") ;;
        esac
    done
}

# COPY sources from the build context exist and are sent; --from names an
# earlier stage.
copies=0
for i in "${!instr[@]}"; do
    [ "${instr[$i]}" = COPY ] || [ "${instr[$i]}" = ADD ] || continue
    copy_words "${args[$i]}"
    srcs=("${paths[@]}")
    [ ${#srcs[@]} -ge 2 ] || fail "${instr[$i]} needs a source and a destination: ${args[$i]}"
    unset 'srcs[${#srcs[@]}-1]'
    if [ -n "$from" ]; then
        found=0
        for ((s = 0; s < ${stage_of[$i]}; s++)); do
            [ "${stage_names[$s]}" = "$from" ] && found=1
        done
        [ $found = 1 ] || fail "COPY --from=$from: no earlier stage of that name"
        continue
    fi
    for src in "${srcs[@]}"; do
        [ -e "$root/$src" ] || fail "COPY source $src does not exist in the build context"
        ignored "$src" && fail "COPY source $src is left out of the build context by .dockerignore"
        copies=$((copies + 1))
    done
done
note "$copies COPY sources from the build context exist and are not ignored"

# The build stage's cargo command, and the binaries it copies out.
cargo_cmd=
build_run=
for i in "${!instr[@]}"; do
    if [ "${stage_of[$i]}" = "$build_stage" ] && [ "${instr[$i]}" = RUN ] && [[ ${args[$i]} == *"cargo build"* ]]; then
        build_run=${args[$i]}
        cargo_cmd=$(sed 's/.*\(cargo build[^&;|]*\).*/\1/; s/ *$//' <<<"$build_run")
    fi
done
[ -n "$cargo_cmd" ] || fail "the build stage has no RUN with cargo build"
note "build stage: $cargo_cmd"
[[ " $cargo_cmd " == *" --release "* ]] || fail "the image's cargo build is not --release"
[[ " $cargo_cmd " == *" --locked "* ]] || fail "the image's cargo build is not --locked (Cargo.lock must decide the versions)"
read -r -a cargo_words <<<"$cargo_cmd"
bins=()
for ((w = 0; w < ${#cargo_words[@]}; w++)); do
    [ "${cargo_words[$w]}" = --bin ] && bins+=("${cargo_words[$((w + 1))]}")
done
[ ${#bins[@]} -gt 0 ] || fail "the image's cargo build names no --bin"
copied_out=$(grep -o 'target/release/[A-Za-z0-9_-]*' <<<"$build_run" | sed 's|target/release/||' | sort -u)
for b in $copied_out; do
    [[ " ${bins[*]} " == *" $b "* ]] || fail "the build stage copies target/release/$b, which its cargo build does not build"
done
for b in "${bins[@]}"; do
    grep -qx "$b" <<<"$copied_out" || fail "the build stage builds $b but does not copy it out"
done
# The build context as the build stage sees it: only what its COPYs bring,
# less what .dockerignore leaves out (target/ directories). Cargo must load
# the workspace from it and resolve it --locked, as the image's build does.
context=$tmp/context
build_workdir=/
for i in "${!instr[@]}"; do
    [ "${stage_of[$i]}" = "$build_stage" ] || continue
    case ${instr[$i]} in
        WORKDIR) build_workdir=${args[$i]} ;;
        COPY)
            read -r -a words <<<"${args[$i]}"
            paths=()
            for w in "${words[@]}"; do
                [[ $w == --* ]] || paths+=("$w")
            done
            dest=${paths[${#paths[@]} - 1]}
            unset 'paths[${#paths[@]}-1]'
            dest=${dest#"$build_workdir"}
            dest=${dest#/}
            for src in "${paths[@]}"; do
                if [[ $dest == */ || $dest == . || $dest == "" ]]; then
                    mkdir -p "$context/$dest"
                    cp -R "$root/$src" "$context/$dest"
                else
                    mkdir -p "$(dirname "$context/$dest")"
                    cp -R "$root/$src" "$context/$dest"
                fi
            done
            ;;
        *) ;;
    esac
done
find "$context" -name target -type d -prune -exec rm -rf {} +
(cd "$context" && "$cargo" tree --locked -q -p quicproquo-server -p quicproquo-client --depth 0 -e normal >/dev/null) ||
    fail "cargo cannot resolve the workspace --locked from what the build stage copies (a missing member or path, or Cargo.lock not current)"
# Build scripts are not compiled by that: what they include must be there.
while IFS= read -r build_rs; do
    while IFS= read -r inc; do
        [ -e "$(dirname "$build_rs")/$inc" ] ||
            fail "${build_rs#"$context"/} includes $inc, which the build stage does not copy"
    done < <(grep -o 'include!("[^"]*")' "$build_rs" | sed 's/include!("//; s/")$//')
done < <(find "$context" -name build.rs)
note "the build stage's files ($(du -sh "$context" | cut -f1)) hold the workspace and its build scripts' includes, and Cargo.lock resolves it --locked"
# The image's toolchain against this host's, which built the binaries run
# below (a difference is worth knowing, not a failure).
host_rust=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p')
image_rust=${global_arg[RUST_VERSION]:-}
if [ -n "$image_rust" ] && [ "$host_rust" != "$image_rust" ]; then
    note "the image builds with Rust $image_rust, this host with ${host_rust:-no rustc}"
fi
ran+=("the Dockerfile read: COPY sources, stages, the build command and what it copies out; the workspace loaded --locked from the build stage's files")

# ------------------------------------------------------------ binaries ---

if [ $release = 1 ]; then
    say "building as the build stage does: $cargo_cmd"
    # In the build stage's files, as the image builds: without .git, so
    # `--version` says `commit unknown`, as the image's does without its
    # QPQ_BUILD_COMMIT build argument. Its own
    # target directory keeps these binaries apart from the workspace's
    # release build, and a second run builds nothing.
    # shellcheck disable=SC2086 # the command's words, as the RUN has them
    (cd "$context" && CARGO_TARGET_DIR=$target_dir/docker-check CARGO_INCREMENTAL=0 "$cargo" ${cargo_cmd#cargo })
    bin_dir=$target_dir/docker-check/release
    ran+=("the build stage's cargo command, on the host")
else
    bin_dir=${bin_dir:-$target_dir/debug}
    not_run+=("the build stage's cargo build (binaries from $bin_dir instead; --release runs it)")
fi
for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || fail "no $bin_dir/$b: build it first (cargo build --bin $b), or pass --bin-dir or --release"
done
note "binaries: $bin_dir"

# ------------------------------------------------- the runtime stage ---

say "the runtime stage (stage $runtime_stage) on the host, in a temporary root"
sysroot=$tmp/root
mkdir -p "$sysroot"

user_spec=
workdir=/
healthcheck=
health_timeout=30s
entrypoint=()
cmd=()
volumes=()
stop_signal=TERM
image_env=()
for i in "${!instr[@]}"; do
    [ "${stage_of[$i]}" = "$runtime_stage" ] || continue
    a=${args[$i]}
    case ${instr[$i]} in
        FROM | EXPOSE | LABEL | ARG) ;;
        RUN) note "not run on the host (it would change this machine's users): RUN $a" ;;
        COPY)
            copy_words "$a"
            dest=${paths[${#paths[@]} - 1]}
            unset 'paths[${#paths[@]}-1]'
            for src in "${paths[@]}"; do
                if [ "$from" = build ]; then
                    grep -qx "$(basename "$src")" <<<"$copied_out" ||
                        fail "COPY --from=build $src: the build stage does not copy that binary out"
                    host_src=$bin_dir/$(basename "$src")
                elif [ -n "$from" ]; then
                    fail "COPY --from=$from: only the build stage is emulated"
                else
                    host_src=$root/$src
                fi
                if [[ $dest == */ ]]; then
                    mkdir -p "$sysroot$dest"
                    cp -R "$host_src" "$sysroot$dest"
                else
                    mkdir -p "$(dirname "$sysroot$dest")"
                    cp -R "$host_src" "$sysroot$dest"
                fi
                note "COPY ${from:+--from=$from }$src -> $dest (from $host_src)"
            done
            ;;
        ENV)
            # KEY=VALUE pairs without quotes or spaces in values, as here.
            read -r -a words <<<"$a"
            for w in "${words[@]}"; do
                [[ $w == *=* ]] || fail "ENV $a: only the KEY=VALUE form is supported here"
                image_env+=("$w")
            done
            ;;
        WORKDIR) workdir=$a ;;
        USER) user_spec=$a ;;
        VOLUME) mapfile -t volumes < <(exec_form "$a") ;;
        STOPSIGNAL) stop_signal=${a#SIG} ;;
        HEALTHCHECK)
            [[ $a =~ --timeout=([0-9]+s) ]] && health_timeout=${BASH_REMATCH[1]}
            [[ $a =~ CMD\ (\[.*\])$ ]] || fail "HEALTHCHECK must use CMD with an exec-form array: $a"
            healthcheck=${BASH_REMATCH[1]}
            ;;
        ENTRYPOINT) mapfile -t entrypoint < <(exec_form "$a") ;;
        CMD) mapfile -t cmd < <(exec_form "$a") ;;
        *) fail "the runtime stage's ${instr[$i]} is not emulated by this script: add it here" ;;
    esac
done
[ -n "$user_spec" ] || fail "the runtime stage has no USER: the server would run as root"
[[ $user_spec =~ ^([0-9]+):([0-9]+)$ ]] || fail "USER $user_spec: give a numeric uid:gid (so a bind-mounted volume can be chowned to it)"
uid=${BASH_REMATCH[1]}
gid=${BASH_REMATCH[2]}
[ "$uid" != 0 ] || fail "USER is root"
[ -n "$healthcheck" ] || fail "the runtime stage has no HEALTHCHECK"
[ ${#entrypoint[@]} -gt 0 ] || fail "the runtime stage has no ENTRYPOINT"
[ ${#volumes[@]} -gt 0 ] || fail "the runtime stage has no VOLUME"
runs=$(for i in "${!instr[@]}"; do
    if [ "${stage_of[$i]}" = "$runtime_stage" ] && [ "${instr[$i]}" = RUN ]; then
        printf '%s\n' "${args[$i]}"
    fi
done)
grep -q -- "--uid $uid" <<<"$runs" || fail "the runtime stage's RUN does not create the user $uid that USER names"
for v in "${volumes[@]}"; do
    grep -q -- "-o $uid -g $gid .*$v" <<<"$runs" ||
        fail "the runtime stage does not make the volume $v owned by $uid:$gid (a named volume takes its owner from the image)"
    # As the RUN's `install -d -o UID -g GID -m 0700` makes it.
    mkdir -p "$sysroot$v"
    chmod 0700 "$sysroot$v"
done

# The ENV, with absolute paths moved under the root. The image's PATH is
# Docker's default; the root's directories come first, the host's stand in
# for the base image's.
rebase() {
    local v=$1
    if [[ $v == /* ]]; then printf '%s' "$sysroot$v"; else printf '%s' "$v"; fi
}
run_env=("PATH=$sysroot/usr/local/sbin:$sysroot/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "HOME=/")
for e in "${image_env[@]}"; do
    k=${e%%=*}
    v=${e#*=}
    if [ "$k" = QPQ_LISTEN ] && [ -n "$port" ]; then
        note "QPQ_LISTEN=$v, with port $port instead (--port)"
        v=${v%:*}:$port
    fi
    run_env+=("$k=$(rebase "$v")")
    note "ENV $k=$v -> $(rebase "$v")"
done
listen=
for e in "${run_env[@]}"; do
    [[ $e == QPQ_LISTEN=* ]] && listen=${e#QPQ_LISTEN=}
done
run_dir=$(rebase "$workdir")
mkdir -p "$run_dir"

# The stage's user: an unprivileged uid, as USER makes it.
as_user=()
if [ "$(id -u)" = 0 ]; then
    command -v setpriv >/dev/null || fail "setpriv (util-linux) is needed to run as uid $uid"
    chown -R "$uid:$gid" "${volumes[@]/#/$sysroot}"
    as_user=(setpriv --reuid="$uid" --regid="$gid" --clear-groups --no-new-privs)
    note "USER $user_spec: processes run as uid $uid, gid $gid, no supplementary groups (setpriv)"
else
    note "USER $user_spec: not root, so processes run as this user ($(id -u)) instead"
    not_run+=("the processes as uid $uid (this script was not run as root)")
fi
in_image() {
    env -i -C "$run_dir" "${run_env[@]}" "${as_user[@]}" "$@"
}
for b in "${bins[@]}"; do
    version=$(in_image "$b" --version) || fail "$b --version failed in the temporary root"
    note "$version"
done
server_help=$(in_image "${entrypoint[@]}" --help)
# The settings in effect in the image, as the server resolves them
# (configuration file, ENV); nothing is bound or created.
if grep -q '^  check-config' <<<"$server_help"; then
    in_image "${entrypoint[@]}" check-config >"$tmp/config.out" 2>&1 || {
        cat "$tmp/config.out" >&2
        fail "qpq-server check-config refuses the image's configuration"
    }
    grep -E '^(listen|data_dir|storage|metrics_listen) ' "$tmp/config.out" | sed 's/^/   | /'
    ran+=("qpq-server check-config with the image's configuration file and ENV")
fi
touch "$tmp/marker"

# Starts the server as the ENTRYPOINT and CMD would, and reads its start
# lines; sets server_pid and fingerprint.
start_server() {
    local log=$1 waited=0
    # A simple command, not the function: $! must be the server itself.
    env -i -C "$run_dir" "${run_env[@]}" "${as_user[@]}" "${entrypoint[@]}" "${cmd[@]}" \
        >"$log.out" 2>"$log.err" &
    server_pid=$!
    while ! grep -q '^certificate SHA-256 fingerprint: ' "$log.out"; do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            cat "$log.out" "$log.err" >&2
            fail "the server exited at start"
        fi
        waited=$((waited + 1))
        [ $waited -lt 600 ] || fail "the server printed no fingerprint within 60 s"
        sleep 0.1
    done
    fingerprint=$(sed -n 's/^certificate SHA-256 fingerprint: //p' "$log.out")
    note "started: $(head -1 "$log.out"), pid $server_pid"
}

# Runs the HEALTHCHECK command as Docker would (same ENV, USER and WORKDIR,
# killed after its --timeout); returns its status.
health() {
    local status=0
    mapfile -t hc < <(exec_form "$healthcheck")
    timeout "$health_timeout" env -i -C "$run_dir" "${run_env[@]}" "${as_user[@]}" "${hc[@]}" >"$tmp/health.out" 2>&1 || status=$?
    sed 's/^/   | /' "$tmp/health.out"
    return $status
}

# Stops the server with the STOPSIGNAL and requires status 0 within
# Docker's default stop timeout (10 s; compose.yaml gives 30 s).
stop_server() {
    local waited=0 status=0
    kill -s "$stop_signal" "$server_pid"
    while kill -0 "$server_pid" 2>/dev/null; do
        waited=$((waited + 1))
        [ $waited -lt 100 ] || fail "the server did not exit within 10 s of SIG$stop_signal"
        sleep 0.1
    done
    wait "$server_pid" || status=$?
    [ $status = 0 ] || {
        cat "$1.err" >&2
        fail "the server exited with status $status after SIG$stop_signal (expected 0)"
    }
    note "SIG$stop_signal: exited 0 within $((waited / 10)).$((waited % 10)) s"
    server_pid=
}

grep -q '^  health' <<<"$server_help" ||
    fail "qpq-server has no \`health\` command, which the HEALTHCHECK runs"

say "the server as the image starts it: ${entrypoint[*]} ${cmd[*]} (listening on $listen)"
start_server "$tmp/first"
first_fingerprint=$fingerprint
say "the HEALTHCHECK: $(exec_form "$healthcheck" | tr '\n' ' ')(timeout $health_timeout)"
health || fail "the HEALTHCHECK failed against the running server"
note "passed"
say "stopping it as docker stop does"
stop_server "$tmp/first"
say "the HEALTHCHECK with the server stopped must fail"
if health; then
    fail "the HEALTHCHECK passed with no server running"
fi
note "failed, as it should"
say "starting again on the same volume"
start_server "$tmp/second"
[ "$fingerprint" = "$first_fingerprint" ] ||
    fail "the fingerprint changed across a restart on the same volume ($first_fingerprint -> $fingerprint)"
note "same certificate fingerprint: $fingerprint"
health || fail "the HEALTHCHECK failed after the restart"
stop_server "$tmp/second"

# Everything the server wrote is in the volume, owned by the stage's user.
outside=$(find "$sysroot" -newer "$tmp/marker" ! -path "$sysroot${volumes[0]}" ! -path "$sysroot${volumes[0]}/*" -print)
[ -z "$outside" ] || fail "files written outside the volume: $outside"
if [ "$(id -u)" = 0 ]; then
    foreign=$(find "${volumes[@]/#/$sysroot}" ! -uid "$uid" -print)
    [ -z "$foreign" ] || fail "files in the volume not owned by uid $uid: $foreign"
fi
note "written only in the volume: $(cd "$sysroot${volumes[0]}" && find . -mindepth 1 -maxdepth 1 | sort | tr '\n' ' ')"
ran+=("the runtime stage on the host: its files, ENV, WORKDIR and USER (uid $uid); the server started as the ENTRYPOINT, the HEALTHCHECK passing, SIG$stop_signal -> exit 0, the HEALTHCHECK failing while it was down, a restart on the same volume with the same fingerprint, nothing written outside the volume")

# ------------------------------------ QPQ_* variables and compose.yaml ---

say "QPQ_* variables set by the Dockerfile, compose.yaml and the systemd files"
known=$(grep -o 'env: QPQ_[A-Z0-9_]*' <<<"$server_help" | sed 's/env: //' | sort -u)
used=$(cat "$dockerfile" "$root/compose.yaml" "$root"/packaging/systemd/* |
    sed 's/\${[^}]*}//g' | grep -o 'QPQ_[A-Z0-9_]*=\|QPQ_[A-Z0-9_]*:' | tr -d '=:' | sort -u)
# The Dockerfile's build arguments are read by the build, not the server.
build_args=$(grep -o '^ARG QPQ_[A-Z0-9_]*' "$dockerfile" | sed 's/^ARG //' | sort -u)
for v in $used; do
    grep -qx "$v" <<<"$build_args" && continue
    grep -qx "$v" <<<"$known" || fail "$v is set but qpq-server reads no such variable (qpq-server --help lists them)"
done
note "$(wc -w <<<"$used") variables, all read by qpq-server: $(tr '\n' ' ' <<<"$used")"
ran+=("the QPQ_* variables the packaging sets, against qpq-server --help")

# The first Python with the yaml module: the one on PATH, or Debian's
# (python3-yaml) when another (pyenv's, say) comes first.
python=
for p in python3 /usr/bin/python3; do
    if "$p" -c 'import yaml' 2>/dev/null; then
        python=$p
        break
    fi
done
if [ -n "$python" ]; then
    say "compose.yaml"
    "$python" - "$root/compose.yaml" <<'EOF'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
services, volumes = c["services"], c.get("volumes") or {}
default = [n for n, s in services.items() if not s.get("profiles")]
assert default == ["qpq-server"], f"services started by default: {default}"
pg = {n for n, s in services.items() if "postgres" in (s.get("profiles") or [])}
assert pg == {"qpq-server-postgres", "postgres"}, f"profile postgres: {pg}"
srv = services["qpq-server-postgres"]
assert srv["environment"]["QPQ_STORAGE"] == "postgres"
assert srv["environment"]["QPQ_POSTGRES_URL"].startswith("postgres://")
assert srv["depends_on"]["postgres"]["condition"] == "service_healthy"
assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
for name, s in services.items():
    for v in s.get("volumes", []):
        source = v.split(":")[0]
        assert source in volumes, f"{name}: volume {source} is not a named volume"
for name in ("qpq-server", "qpq-server-postgres"):
    s = services[name]
    assert s["build"] == ".", name
    assert "7443:7443/udp" in s["ports"], name
    assert any(v.endswith(":/data") for v in s["volumes"]), name
    grace = s["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > 5, f"{name}: stop_grace_period {grace}"
print("   services by default: qpq-server; profile postgres: qpq-server-postgres and postgres "
      "(healthy before the server starts); named volumes: " + ", ".join(volumes))
EOF
    ran+=("compose.yaml parsed: default service, the postgres profile, its health dependency, named volumes")
else
    missing_tool "compose.yaml not parsed: Python's yaml module is missing (Debian: python3-yaml)"
fi

# ------------------------------------------------- a container engine ---

say "a container engine"
if ! command -v docker >/dev/null 2>&1; then
    engine_state="no container engine here: the docker CLI is not installed"
elif timeout 20 docker info >/dev/null 2>&1; then
    engine_state=answers
else
    engine_state="no container engine here: the docker CLI is installed, but no daemon answers \`docker info\`"
fi
if [ "$engine_state" = answers ] && [ $engine = 1 ]; then
    note "a daemon answers: docker build, docker run until healthy, docker stop"
    tag=qpq-docker-check:$$
    docker build -t "$tag" "$root"
    cid=$(docker run -d "$tag")
    waited=0
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ]; do
        waited=$((waited + 1))
        if [ $waited -ge 120 ]; then
            docker logs "$cid" >&2 || true
            docker rm -f -v "$cid" >/dev/null || true
            fail "the container was not healthy within 120 s"
        fi
        sleep 1
    done
    note "healthy after about $waited s"
    docker stop -t 30 "$cid" >/dev/null
    code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
    docker logs "$cid" 2>&1 | tail -n 5 | sed 's/^/   | /'
    docker rm -v "$cid" >/dev/null
    docker image rm "$tag" >/dev/null
    [ "$code" = 0 ] || fail "the container exited with $code after docker stop"
    ran+=("docker build, docker run until Docker called it healthy, docker stop -> exit 0")
else
    if [ "$engine_state" = answers ]; then
        note "a daemon answers, but --no-engine: not used"
    else
        note "$engine_state"
    fi
    not_run+=("docker build: pulling the base images, the build inside the rust image with BuildKit's cache mounts, the runtime stage's RUN (its user and /data)")
    not_run+=("docker run: a real container's user, volume and network, and Docker's own HEALTHCHECK schedule")
    compose_note=
    docker compose version >/dev/null 2>&1 || compose_note=" (its plugin is not installed either)"
    not_run+=("docker compose$compose_note: neither service started, no PostgreSQL from its image")
fi

echo
echo "Checked:"
printf '  - %s\n' "${ran[@]}"
if [ ${#not_run[@]} -gt 0 ]; then
    echo "Not run on this machine:"
    printf '  - %s\n' "${not_run[@]}"
fi
echo "docker-check: OK"
