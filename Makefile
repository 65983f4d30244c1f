# Two entry points: `make demo` and `make test`. Both install into .venv first (pinned versions,
# CPU torch 2.13.0 from constraints.txt, so no CUDA wheels are pulled on CPU machines).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/llmstack quickstart

test: setup
	$(BIN)/pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache

# --- wheelhouse for the GPU machine (bench/gpu_check.sh) ----------------------------------------
# The GPU machine has Python 3.12 with torch 2.11 (CUDA), triton, transformers, peft, accelerate,
# safetensors, tokenizers, sentencepiece, pyarrow, tensorboard, matplotlib and pytest, and therefore
# (their dependencies) numpy, packaging, psutil, PyYAML, tqdm, jinja2, filelock, fsspec, regex,
# huggingface-hub, click, absl-py, six, python-dateutil, idna. It has no network. Assumed missing and
# shipped here, as cp312 manylinux x86_64 or pure wheels at the versions constraints.txt pins (the
# rest at the versions tested in .venv), each with --no-deps, so nothing is resolved and torch is never touched:
#   deepspeed (built from its source release, no precompiled ops) + einops hjson msgpack ninja py-cpuinfo
#   pydantic + pydantic-core annotated-types typing-inspection
#   datasets + dill multiprocess xxhash pandas; zstandard; requests + urllib3 certifi charset-normalizer
#   lm-eval + evaluate sacrebleu (portalocker tabulate colorama lxml) pytablewriter (dataproperty
#     mbstrdecoder chardet pathvalidate tabledata tcolorpy typepy pytz) rouge-score nltk (joblib
#     cloudpickle defusedxml) sqlitedict word2number more-itertools
#   typing-extensions and fsspec: installed there only when the preinstalled version is outside what
#     the packages above require (pydantic needs typing-extensions >= 4.16, datasets fsspec <= 2026.9)
# Left out on purpose: scikit-learn + scipy (~50 MB, over the 64 MiB that the working tree and the
# wheels may take together; lm-eval imports them only for its f1 / mcc metrics) and aiohttp
# (fsspec[http], remote files only). bench/gpu_check.sh installs from here with
# `pip install --no-index --find-links wheels --no-deps NAME==VERSION ...` (only what is missing).
GPU_WHEELS ?= wheels
GPU_WHEELS_MAX_MIB ?= 60
GPU_PIP ?= $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip)
GPU_BINARY_PKGS := \
	einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0 \
	pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 fsspec==2026.9.0 \
	datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pandas==3.1.1 zstandard==0.25.0 \
	requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 \
	lm-eval==0.4.13 evaluate==0.4.6 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 \
	lxml==6.2.0 pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 \
	pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 pytz==2026.6 \
	nltk==3.10.4 joblib==1.6.0 cloudpickle==3.1.3 defusedxml==0.7.1 more-itertools==11.2.1
# source releases only: built here into pure-Python wheels
GPU_SOURCE_PKGS := deepspeed==0.19.8 rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1

.PHONY: gpu-wheels

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(GPU_PIP) download --quiet --no-deps --only-binary=:all: -c constraints.txt --python-version 3.12 \
	    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) $(GPU_BINARY_PKGS)
	DS_BUILD_OPS=0 $(GPU_PIP) wheel --quiet --no-deps -c constraints.txt -w $(GPU_WHEELS) $(GPU_SOURCE_PKGS)
	@ls -1 $(GPU_WHEELS)
	@kib=$$(du -sk $(GPU_WHEELS) | cut -f1); \
	    echo "$(GPU_WHEELS)/: $$(ls $(GPU_WHEELS)/*.whl | wc -l) wheels, $$((kib / 1024)) MiB ($$kib KiB); limit $(GPU_WHEELS_MAX_MIB) MiB"; \
	    test $$kib -le $$(( $(GPU_WHEELS_MAX_MIB) * 1024 )) || { echo "$(GPU_WHEELS)/ is over $(GPU_WHEELS_MAX_MIB) MiB" >&2; exit 1; }
