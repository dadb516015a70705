# Ray Jobs and cluster targets. The top-level Makefile includes this file and
# defines PYTHON (the project's interpreter) and the setup target.
#
#   make submit JOB=train CONFIG=jobs/configs/method4.yaml ARGS="--shards s3://... --output s3://..."
#   make job-status ID=raysubmit_...   make job-logs ID=...   make job-stop ID=...   make job-list
#   make cluster-up / cluster-dashboard / cluster-down   (AWS cluster launcher, CLUSTER_CONFIG)
#
# The cluster address comes from RAY_ADDRESS (default http://127.0.0.1:8265), for
# example `make submit RAY_ADDRESS=http://127.0.0.1:8265 ...`. JOB_PYTHON is the
# interpreter on the head node (default: python, first on the head's PATH).

PYTHON ?= .venv/bin/python
SUBMIT := $(PYTHON) -m infra.submit
RAY_CLI := RAY_USAGE_STATS_ENABLED=0 $(PYTHON) -m ray.scripts.scripts
CLUSTER_CONFIG ?= infra/aws/cluster.yaml
JOB_PYTHON ?= python

.PHONY: submit job-status job-logs job-stop job-list cluster-up cluster-dashboard cluster-down

define require
	@test -n "$($(1))" || { echo "error: set $(1), for example: $(2)" >&2; exit 2; }
endef

submit: setup
	$(call require,JOB,make submit JOB=train CONFIG=jobs/configs/method4.yaml ARGS=\"--shards ... --output ...\")
	$(SUBMIT) submit --job $(JOB) $(if $(CONFIG),--config $(CONFIG)) --python $(JOB_PYTHON) -- $(ARGS)

job-status: setup
	$(call require,ID,make job-status ID=raysubmit_XYZ)
	$(SUBMIT) status $(ID)

job-logs: setup
	$(call require,ID,make job-logs ID=raysubmit_XYZ)
	$(SUBMIT) logs $(ID)

job-stop: setup
	$(call require,ID,make job-stop ID=raysubmit_XYZ)
	$(SUBMIT) stop $(ID)

job-list: setup
	$(SUBMIT) list

# Run these from the repository root: the launcher resolves the relative
# file_mounts paths in the cluster config against the current directory.
cluster-up: setup
	$(RAY_CLI) up --yes $(CLUSTER_CONFIG)

cluster-dashboard: setup
	$(RAY_CLI) dashboard $(CLUSTER_CONFIG)

cluster-down: setup
	$(RAY_CLI) down --yes $(CLUSTER_CONFIG)
