# Two commands on a fresh machine: `make demo` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml
RUNS   ?= runs

.PHONY: install test test-full demo overfit bench bench-fewshot sweep-fewshot bench-tta print-config tensorboard report clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install  ## fast suite (< 10 min on 2 cores); pytest's exit 5 (no tests) fails the target
	$(BIN)/python -m pytest -q

test-full: install  ## everything, including tests marked slow
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: install  ## CPU training on real ARC-AGI-1 tasks that fit a 10x10 canvas, then held-out ARC pass@k
	$(BIN)/trm fit --config configs/demo.yaml
	run=$$(ls -td runs/demo/version_* | head -1) && \
	  $(BIN)/trm test --config $$run/config.yaml --ckpt_path $$run/checkpoints/last.ckpt \
	    --trainer.logger.init_args.name demo_test --progress_bar.refresh_rate 0 --verbose false

overfit: install  ## the seed's E1 gate on CPU: exit 0 with `overfit: PASS ...` or 1 with `overfit: FAIL ...`
	$(BIN)/trm fit --config configs/overfit_cpu.yaml

bench: install  ## speed: train step + encoder overhead, eval rollout, data loading (CPU: the demo and ARC configs)
	$(BIN)/python benchmarks/bench_train.py --preset demo --batch 32
	$(BIN)/python benchmarks/bench_train.py --preset arc --batch 8 --steps 2
	$(BIN)/python benchmarks/bench_eval.py --preset demo --batch 32
	$(BIN)/python benchmarks/bench_eval.py --preset arc --batch 8 --steps 1
	$(BIN)/python benchmarks/bench_data.py --preset arc --batch 64 --steps 10

bench-fewshot: install  ## held-out rules on the CPU: encoder-TRM (real vs shuffled context) and the puzzle-id baseline
	$(BIN)/python benchmarks/bench_fewshot.py --encoder-config configs/fewshot/contrastive.yaml

sweep-fewshot: install  ## the seed's experiment table on the held-out-rule benchmark: one fit per row (2 h on 2 shared cores), then trm report
	$(BIN)/python benchmarks/sweep_fewshot.py

bench-tta: install  ## test-time adaptation on the held-out rules: the model `make bench-fewshot` trained, each method, gains with CIs
	$(BIN)/python benchmarks/bench_tta.py --run runs/fewshot --train-trm-protocol

print-config: install  ## the resolved config of CONFIG (default: the demo)
	$(BIN)/trm fit --config $(CONFIG) --print_config

tensorboard: install  ## serve the logs under runs/
	$(BIN)/tensorboard --logdir runs --bind_all

report: install  ## tracking table + plots of every run under RUNS (default runs/) into RUNS/report/; BASELINE=<name/version_n>
	$(BIN)/trm report $(RUNS) $(if $(BASELINE),--baseline $(BASELINE))

clean:
	rm -rf runs lightning_logs .pytest_cache
