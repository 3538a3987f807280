#!/usr/bin/env bash
# vLLM 0.26.0's compiled MoE ops (the newest built for the GPU machine's torch 2.11),
# slimmed to Hopper, for vllm_fused_layer.py: writes .vllm_gpu/moe_C_0.26.0_sm90.so.gz
# (git-ignored; about 15 MB instead of 41, so it fits one device call's carry beside
# vLLM 0.33.0's Python bundle).
#   bash tests/device/make_vllm_moe_ops.sh [vllm-0.26.0-*.whl | _moe_C_stable_libtorch.abi3.so]
# Slimming: the payload of every cubin built for another GPU (sm_75..sm_120, not sm_90/90a)
# in the .nv_fatbin section is zeroed in place; headers, PTX and the ELF layout are kept,
# so an H100/H200 loads exactly the code it loaded before (its sm_90 cubins, else the
# compute_80 PTX, JIT-compiled as before), and gzip squeezes the zeros out.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
src=${1:-}
work=$(mktemp -d)
if [[ -z $src ]]; then
  python3 -m pip download --quiet --no-deps --dest "$work" vllm==0.26.0
  src=$(ls "$work"/vllm-0.26.0-*.whl)
fi
if [[ $src == *.whl ]]; then
  python3 -m zipfile -e "$src" "$work/x" >/dev/null 2>&1 || unzip -q -o "$src" 'vllm/_moe_C_stable_libtorch.abi3.so' -d "$work/x"
  src="$work/x/vllm/_moe_C_stable_libtorch.abi3.so"
fi
mkdir -p "$repo/.vllm_gpu"
python3 - "$src" "$work/slim.so" <<'PY'
import struct, subprocess, sys

src, dst = sys.argv[1:]
data = bytearray(open(src, "rb").read())
sections = subprocess.run(["readelf", "-SW", src], capture_output=True, text=True, check=True).stdout
row = next(line for line in sections.splitlines() if " .nv_fatbin " in line).split()
offset, size = int(row[row.index(".nv_fatbin") + 3], 16), int(row[row.index(".nv_fatbin") + 4], 16)
pos, kept, zeroed = offset, 0, 0
while pos < offset + size:
    magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)  # one fat binary: magic, version, sizes
    if magic != 0xBA55ED50:
        pos += 8  # alignment padding between fat binaries
        continue
    entry, end = pos + header, pos + header + fat
    while entry < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)  # kind 1 PTX, 2 cubin
        arch = struct.unpack_from("<I", data, entry + 28)[0]
        if kind == 2 and arch != 90:
            data[entry + entry_header: entry + entry_header + payload] = bytes(payload)
            zeroed += payload
        else:
            kept += payload
        entry += entry_header + payload
    pos = end
open(dst, "wb").write(data)
print(f"kept {kept / 1e6:.1f} MB (sm_90 cubins, PTX), zeroed {zeroed / 1e6:.1f} MB of other GPUs' cubins")
PY
gzip -9 -c "$work/slim.so" >"$repo/.vllm_gpu/moe_C_0.26.0_sm90.so.gz"
rm -rf "$work"
du -h "$repo/.vllm_gpu/moe_C_0.26.0_sm90.so.gz"
