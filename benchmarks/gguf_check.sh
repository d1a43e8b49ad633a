#!/usr/bin/env bash
# Issue #26: our GGUF export checked in llama.cpp itself. Not in CI (it builds llama.cpp).
#
# 1. builds llama-perplexity from the llama-cpp-python==0.3.36 sdist's vendored llama.cpp (once;
#    about 6 minutes on 2 cores), 2. exports MODEL (default: the demo's final model, else a
#    20-layer Block-Influence start of SmolLM2 with a bridge at every seam) and the reference
#    with `inheritune export` (f32, f16, q8_0) and with llama.cpp's own convert_hf_to_gguf.py
#    (f32, f16), 3. runs llama-perplexity on held-out Brown text (context 256, 24 chunks) for
#    each file and the same protocol in transformers on the Hugging Face folder, 4. writes
#    benchmarks/results/gguf_check.md.
#
#   bash benchmarks/gguf_check.sh            # WORK=runs/gguf-check MODEL=... to change
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
WORK=${WORK:-runs/gguf-check}
CTX=256
CHUNKS=24
VER=0.3.36
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ROWS="$WORK/rows.jsonl"
touch "$ROWS"  # finished rows are kept: a rerun measures only what is missing
# llama.cpp's converter imports sentencepiece even for byte-level BPE tokenizers
$PY -c "import sentencepiece" 2>/dev/null || $PY -m pip install -q sentencepiece

if [ ! -x "$WORK/build/bin/llama-perplexity" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$WORK/sdist"
  tar -xzf "$WORK/sdist/llama_cpp_python-$VER.tar.gz" -C "$WORK"
  cmake -S "$WORK/llama_cpp_python-$VER/vendor/llama.cpp" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON > "$WORK/cmake.log"
  cmake --build "$WORK/build" --target llama-perplexity -j 2 > "$WORK/build.log"
fi
LCPP="$WORK/llama_cpp_python-$VER/vendor/llama.cpp"

MODEL=${MODEL:-runs/demo/final_model}
if [ ! -f "$MODEL/config.json" ]; then
  MODEL="$WORK/bi20"
  [ -f "$MODEL/provenance.json" ] || $PY -m inheritune inherit --num-layers 20 --select bi \
    --bridge block --data brown --out "$MODEL"
fi
REF=$($PY -c "from inheritune.models import loading as m; print(m.resolve_model('smollm2-135m').path)")
[ -s "$WORK/brown.txt" ] || $PY benchmarks/gguf_check.py text --out "$WORK/brown.txt"
MACHINE=$($PY -c "import json; from inheritune.training.monitor import cpu_info; print(json.dumps(cpu_info()))")

have() { grep -q "\"model\": \"$1\", \"file\": \"$2\"" "$ROWS"; }
row() {  # model-label file-label ppl (the folder: $folder)
  printf '{"model": "%s", "file": "%s", "ppl": %s, "folder": "%s", "machine": %s}\n' "$1" "$2" "$3" \
    "$folder" "$MACHINE" >> "$ROWS"
  echo "$1 / $2: PPL $3"
}
lcpp_ppl() {
  "$WORK/build/bin/llama-perplexity" -m "$1" -f "$WORK/brown.txt" -c $CTX --chunks $CHUNKS -t 2 \
    2> "$1.log" > /dev/null || { tail -5 "$1.log"; exit 1; }
  grep -o 'Final estimate: PPL = [0-9.]*' "$1.log" | awk '{print $NF}'
}

for pair in "target:$MODEL" "reference:$REF"; do
  label=${pair%%:*}; folder=${pair#*:}
  have "$label" transformers || row "$label" transformers "$($PY benchmarks/gguf_check.py \
    hf-ppl --model "$folder" --text "$WORK/brown.txt" --ctx $CTX --chunks $CHUNKS | awk '{print $NF}')"
  for t in f32 f16 q8_0; do
    have "$label" "inheritune export $t" && continue
    f="$WORK/$label-ours-$t.gguf"
    $PY -m inheritune export --model "$folder" --gguf "$f" --outtype $t --force > /dev/null
    row "$label" "inheritune export $t" "$(lcpp_ppl "$f")"
  done
  for t in f32 f16; do
    have "$label" "llama.cpp convert $t" && continue
    f="$WORK/$label-llamacpp-$t.gguf"
    PYTHONPATH="$LCPP/gguf-py" $PY "$LCPP/convert_hf_to_gguf.py" "$folder" --outfile "$f" \
      --outtype $t > "$f.convert.log" 2>&1 || { tail -5 "$f.convert.log"; exit 1; }
    row "$label" "llama.cpp convert $t" "$(lcpp_ppl "$f")"
  done
done
$PY benchmarks/gguf_check.py report --rows "$ROWS" --out benchmarks/results/gguf_check.md
