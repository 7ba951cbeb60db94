# make demo   install, train a reference subject, run it through `dare serve` over REST
# make test   the whole test suite; brings what it needs first (.ci/prepare: Debian packages,
#             PostgreSQL and Redis started when they are not running)
# make mutation   cosmic-ray over the core modules (hours; not part of test or CI): bench/mutation.py
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DARE   := $(VENV)/bin/dare
PORT   ?= 8000
DEMO   ?= demo-out
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test serve prepare mutation

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ./clients/python -e '.[dev]'
	@# An older install's dare-service owned bin/dare; replacing it removes the script the client
	@# had just written, so put it back.
	test -x $(DARE) || $(PY) -m pip install -q --force-reinstall --no-deps -e ./clients/python
	touch $@

$(DEMO)/subject/model.onnx: | install
	$(DARE) train-reference --arch lenet --dataset digits --epochs 10 --out $(DEMO)/subject

demo: install $(DEMO)/subject/model.onnx
	$(PY) -m service.cli.demo --subject $(DEMO)/subject --out $(DEMO) --port $(PORT)

prepare:
	bash .ci/prepare

# pytest's exit code 5 (no test collected) is a failure here, not a pass. --durations: the
# slowest tests are named at the end of every run, so the suite's time stays in view.
test: prepare install
	$(PY) -m pytest -q --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

serve: install
	$(DARE) serve --port $(PORT)

# MUTATE=worker/engine/tuning.py limits it to some modules; a re-run resumes their sessions.
mutation: install
	nice $(PY) -m bench.mutation --out bench/results/mutation.md $(MUTATE)
