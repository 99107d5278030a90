# The README's commands. `make run` and `make test` each set up everything first:
# a virtual environment in .venv with the pinned set from requirements.lock.
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
# The steps call `python`; DVC runs them through the shell, so the venv goes first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install run test test-quick lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	sha256sum < requirements.lock > $(VENV)/.requirements.lock.sha256  # prefect.yaml's pull step
	touch $@

# The main job: the whole pipeline on the embedded default data (sklearn's digits), offline.
run: install
	dvc repro

test: install
	pytest

# The loop while developing: every test but those marked slow (servers, whole pipelines).
test-quick: install
	pytest -m "not slow"

lint: install
	ruff check .

# Re-pin after changing the ranges in pyproject.toml: resolve into a fresh venv, freeze it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) data/prepared outputs

# The local stack, on loopback: a Prefect server (UI at http://127.0.0.1:4200), an MLflow server
# (UI at http://127.0.0.1:5000) and a process worker on pool `local`, each a background process
# with its pid and log under .stack/. `make deploy` registers prefect.yaml's deployments (a worker
# runs the committed code: commit first), `make pipeline` runs the digits one and follows it
# (SET='train.epochs=5 train.lr=0.01': settings for that run, as --set elsewhere).
# The MLflow server serves the project's own store, the one `dvc repro` tracks into (mlflow.db,
# mlartifacts/): one place for every run and one registry. Its artifacts are files on this host,
# written by each client itself (not proxied), as the embedded store's are.
.PHONY: stack-up deploy pipeline stack-down
STACK := .stack
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PREFECT_API = http://127.0.0.1:$(PREFECT_PORT)/api
# The worker asks for scheduled runs every PREFECT_WORKER_QUERY_SECONDS (Prefect's default 10 s,
# which a run waits 5 s for on average); 2 s costs a local server nothing.
STACK_ENV = PREFECT_HOME=$(abspath $(STACK))/prefect PREFECT_API_URL=$(PREFECT_API) \
	PREFECT_WORKER_QUERY_SECONDS=2 \
	MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) PREFECT_SERVER_ANALYTICS_ENABLED=false
# $(call start,NAME,COMMAND): start COMMAND in the background, in a session of its own (so that
# stack-down stops all it started), unless its pid is alive. With SIGINT handled as from a
# terminal: a shell ignores it for what it starts with `&`, and the Prefect worker stops on
# SIGTERM by sending itself SIGINT (it ignored both, until stack-down killed it).
define start
	@if [ -f $(STACK)/$(1).pid ] && kill -0 $$(cat $(STACK)/$(1).pid) 2>/dev/null; then \
		echo "$(1) already running (pid $$(cat $(STACK)/$(1).pid))"; \
	else \
		$(STACK_ENV) env --default-signal=INT setsid $(2) > $(STACK)/$(1).log 2>&1 & \
		echo $$! > $(STACK)/$(1).pid; \
		echo "started $(1) (pid $$(cat $(STACK)/$(1).pid), log $(STACK)/$(1).log)"; \
	fi
endef
# $(call wait,NAME,HEALTH URL): until the URL answers (checked 5 times a second), or fail with the
# end of NAME's log when it exits or takes over 3 minutes.
define wait
	@for i in $$(seq 900); do curl -sf $(2) > /dev/null && exit 0; \
		kill -0 $$(cat $(STACK)/$(1).pid) 2>/dev/null || { tail -20 $(STACK)/$(1).log; exit 1; }; \
		sleep 0.2; done; echo "$(1) did not answer at $(2)"; exit 1
endef

# The two servers start together; the work pools are looked up over HTTP (milliseconds, where the
# prefect command takes seconds to start) and made only when missing.
# The servers' databases: the project's mlflow.db (the embedded store) and a SQLite file under
# .stack for Prefect, unless the environment names others, e.g. PostgreSQL:
# MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow and
# PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect.
# Both servers read them from the environment: no password on a command line.
stack-up: export MLFLOW_BACKEND_STORE_URI ?= sqlite:///$(abspath mlflow.db)
stack-up: install
	mkdir -p $(STACK)/workspace $(STACK)/prefect
	$(call start,prefect-server,$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT))
	$(call start,mlflow,$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 --default-artifact-root $(abspath mlartifacts) --no-serve-artifacts)
	$(call wait,prefect-server,$(PREFECT_API)/health)
	$(call wait,mlflow,http://127.0.0.1:$(MLFLOW_PORT)/health)
	@for pool in local gpu; do curl -sf $(PREFECT_API)/work_pools/$$pool > /dev/null || \
		$(STACK_ENV) prefect work-pool create $$pool --type process > /dev/null; \
		echo "work pool $$pool (process)"; done
	$(call start,worker,$(BIN)/prefect worker start --pool local --name local-$$(hostname))

deploy: install
	@$(STACK_ENV) prefect --no-prompt deploy --all

pipeline: install
	@params=$$(cnn-pipeline check $(foreach s,$(SET),--set '$(s)')) && \
		$(STACK_ENV) prefect deployment run 'training-pipeline/digits' --params "$$params" --watch
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)/runs  MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"

# The worker first, and only when it is gone the servers (a worker whose server went away while it
# shut down once lived on for 20 minutes). Each gets SIGTERM, STOP_GRACE_S seconds to exit, then
# SIGKILL: all processes of its session and of its children's sessions (the server's workers, the
# worker's flow runs, which Prefect starts in sessions of their own). A pid file whose process is
# not the leader of its own session is stale (the pid was reused): nothing is signalled.
STOP_GRACE_S ?= 30
stack-down:
	@kids() { for k in $$(ps -o pid= --ppid $$1); do echo $$k; kids $$k; done; }; \
	alive() { ps -o stat= --sid $$1 2>/dev/null | grep -q '^[^Z]'; }; \
	signal() { for s in $$(echo $$2 | tr , ' '); do pkill -$$1 -s $$s; done; }; \
	for name in worker mlflow prefect-server; do \
		[ -f $(STACK)/$$name.pid ] || continue; pid=$$(cat $(STACK)/$$name.pid); \
		rm -f $(STACK)/$$name.pid; \
		if [ "$$(ps -o sid= -p $$pid 2>/dev/null | tr -d ' ')" != "$$pid" ] || ! alive $$pid; then \
			echo "$$name (pid $$pid) was not running"; continue; fi; \
		sids=$$(ps -o sid= -p $$(echo $$pid $$(kids $$pid) | tr ' ' ,) | sort -un | paste -sd, | tr -d ' '); \
		count=$$(ps -o pid= --sid $$sids | wc -l); [ $$count = 1 ] && n=process || n=processes; \
		signal TERM $$sids; \
		for i in $$(seq $$(( $(STOP_GRACE_S) * 5 ))); do alive $$sids || break; sleep 0.2; done; \
		if alive $$sids; then signal KILL $$sids; \
			for i in $$(seq 50); do alive $$sids || break; sleep 0.2; done; \
			echo "killed $$name (pid $$pid, $$count $$n): running $(STOP_GRACE_S) s after SIGTERM"; \
		else echo "stopped $$name (pid $$pid, $$count $$n) within $$((i / 5)).$$((i * 2 % 10)) s" \
			"of SIGTERM"; fi; \
	done

# Serve the registry's champion with MLflow's model server on 127.0.0.1:$(SERVE_PORT) (image files
# or uint8 arrays in, class names out: docs/serving.md): `cnn-pipeline serve`. The registry is the
# one MLFLOW_TRACKING_URI names, else the embedded mlflow.db; the model is register.model_name's
# champion unless SERVE_MODEL names another. Loading it runs the model's logged code.
.PHONY: serve
SERVE_PORT ?= 5001
serve: install
	cnn-pipeline serve --port $(SERVE_PORT) $(if $(SERVE_MODEL),--model "$(SERVE_MODEL)")
